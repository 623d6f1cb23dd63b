"""Image-classification data: built-in loaders by name, batching and augmentation."""
from .datasets import DATASETS, ImageData, load_data
from .loader import BatchIterator, augment_batch

__all__ = ["DATASETS", "ImageData", "load_data", "BatchIterator", "augment_batch"]
