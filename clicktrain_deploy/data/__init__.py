"""Image-classification data: built-in loaders by name, batching and augmentation."""
from .datasets import DATASETS, FolderData, ImageData, load_data
from .folder import FolderBatches, FolderSplit
from .loader import BatchIterator, augment_batch, make_batches

__all__ = ["DATASETS", "FolderBatches", "FolderData", "FolderSplit", "ImageData", "load_data",
           "BatchIterator", "augment_batch", "make_batches"]
