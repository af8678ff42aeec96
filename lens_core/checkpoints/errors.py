"""The error class of the checkpoint loaders."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A file or folder that is not (or not a complete / valid) Lens checkpoint of the requested kind."""
