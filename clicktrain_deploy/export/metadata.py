"""TRANSITIONAL (issue 12): the pattern metadata schema lives in ``clicktrain_deploy.contract``.

This module only re-exports it for the callers not yet switched (``compile/lower.py``,
``compile/cuda/lower.py``, ``passes/relax_passes.py``, ``tests/test_relax_pass.py``); delete it
once they import ``clicktrain_deploy.contract``.
"""
from ..contract import (  # noqa: F401
    METADATA_KEY, SCHEMA, VERSION, LayerEntry, MetadataError, PatternMetadata, parse_metadata,
)
