"""Shape facts read from a checkpoint's header (no torch: ``inspect`` uses them without importing PyTorch)."""
from __future__ import annotations

from .errors import CheckpointError
from .source import TensorSource


def tensor_dims(source: TensorSource, key: str, ndim: int, what: str) -> tuple:
    """The shape of ``key`` (which must exist, with ``ndim`` non-zero dimensions) or a CheckpointError."""
    if key not in source:
        raise CheckpointError(f"{source.origin}: expected tensor {key!r} ({what}), found none; the file is "
                              f"incomplete or not this model")
    dims = tuple(source.shape(key))
    if len(dims) != ndim or not all(dims):
        raise CheckpointError(f"{source.origin}: tensor {key!r} ({what}) expected {ndim} non-zero dimensions, "
                              f"found shape {list(dims)}; the file is corrupt or not this model")
    return dims


def block_count(source, pattern: str) -> int:
    """1 + the largest N among keys matching ``pattern`` (a regex with one group of digits); 0 if none."""
    import re

    rx = re.compile(pattern)
    return 1 + max((int(m.group(1)) for k in source.keys() if (m := rx.match(k)) and len(m.group(1)) <= 4),
                   default=-1)
