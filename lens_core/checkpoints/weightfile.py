"""The weight-file interface: one validated file of named tensors, read tensor by tensor with positioned reads.

:class:`WeightFile` is what every loader sees of a file; its two kinds are siblings, chosen by content (the first
bytes, never the file name) in :func:`lens_core.checkpoints.locate.open_weight_file`:

- :class:`~lens_core.checkpoints.safetensors.SafetensorsFile` (header validated as strictly as the reference
  library), and
- :class:`~lens_core.checkpoints.gguf.GGUFFile` (bounded walk of the GGUF header; block-quantized tensors
  exposed through :meth:`WeightFile.is_quantized` / ``read_bytes``).

A subclass parses its header in ``__init__`` into ``entries`` ({name: :class:`TensorEntry`}, absolute byte
offsets), ``metadata`` and ``size``, and calls :meth:`_opened` with the ``os.fstat`` of the file it parsed. The
base class then reads bytes with plain positioned reads (no memory map: a file that shrinks or is replaced
while it is read becomes a :class:`CheckpointError` naming it, never a SIGBUS), checks after every tensor that
the file is still the one whose header was validated, and casts / moves through one small staging buffer.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os

from collections.abc import Mapping

from .. import readahead
from ..lazy_torch import torch
from .errors import CheckpointError

#: safetensors dtype name → bytes per element (header validation needs no torch)
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}


class _TorchDtypes(Mapping):
    """safetensors dtype name → torch dtype (``reverse``: torch dtype → name), built on first use, so that reading
    headers never imports torch."""

    def __init__(self, reverse: bool = False):
        self._reverse, self._map = reverse, None

    def _get(self) -> dict:
        if self._map is None:
            names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                     "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
                     "U64": "uint64", "F8_E8M0": "float8_e8m0fnu"}
            table = {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}
            self._map = {v: k for k, v in table.items()} if self._reverse else table
        return self._map

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())

    def __contains__(self, key):
        if not self._reverse and isinstance(key, str):
            return key in ST_ITEMSIZE and key in self._get()
        return key in self._get()


ST_DTYPES = _TorchDtypes()
ST_NAMES = _TorchDtypes(reverse=True)

_READ_CHUNK = 1 << 30            # bytes per read call (Linux reads at most ~2 GiB at once)
_STAGING_BYTES = 16 << 20        # staging buffer for reads that cast or go to another device


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return ST_ITEMSIZE[dtype]


@dataclasses.dataclass
class TensorEntry:
    name: str           # key as stored in the file
    dtype: str          # safetensors dtype name (GGUF: the GGML type name, e.g. F16, Q4_K)
    shape: tuple
    start: int          # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class WeightFile:
    """One weight file: ``path``, ``size``, ``metadata``, ``entries`` and tensor-by-tensor reads.

    ``format`` names the container (``"safetensors"``, ``"gguf"``). Tensors whose ``entries[name].dtype`` is a
    key of :data:`ST_DTYPES` are read by :meth:`read` directly; a subclass overrides :meth:`read` for stored
    types of its own (GGUF blocks) and :meth:`is_quantized` for tensors that can stay in their stored form.
    """

    format = ""
    path: str
    size: int
    metadata: dict
    entries: dict

    def _opened(self, st: os.stat_result):
        """Record which file the parsed header belongs to (device, inode, size, mtime) and reset the reader."""
        self.size = st.st_size
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._file = None
        self._staging = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what is stored ------------------------------------------------------------------------------
    def is_quantized(self, name: str) -> bool:
        """Whether ``name`` is stored in a block-quantized type of the container (read_bytes keeps it)."""
        return False

    def quant_type(self, name: str) -> str | None:
        """The stored block type of ``name`` when :meth:`is_quantized`, else None."""
        return self.entries[name].dtype if self.is_quantized(name) else None

    # -- data access -------------------------------------------------------------------------------
    def _changed(self, detail: str = ""):
        try:
            now = os.stat(self.path).st_size
            found = f"; it had {self._identity[2]} bytes when opened and has {now} now"
        except OSError:
            found = "; it is gone now"
        raise CheckpointError(f"{self.path}: the file changed while it was being read{detail}{found}. It is still "
                              f"being written (download in progress, full disk) or was replaced. Fix: wait until "
                              f"it is complete (or download it again) and load it again")

    def _check_unchanged(self, name: str):
        st = os.fstat(self._file.fileno())
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            self._changed(f" (after reading tensor {name!r})")

    def _fd(self) -> int:
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
            st = os.fstat(self._file.fileno())
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
                self._changed()
        return self._file.fileno()

    def _read_into(self, address: int, offset: int, length: int):
        """Read ``length`` file bytes at ``offset`` into memory at ``address``; a short read (the file shrank)
        raises CheckpointError."""
        self._fd()
        done = 0
        while done < length:
            n = min(_READ_CHUNK, length - done)
            view = (ctypes.c_char * n).from_address(address + done)
            self._file.seek(offset + done)
            got = self._file.readinto(view)
            if not got:
                self._changed(f" (reading {length} bytes at offset {offset} hit the end of the file)")
            done += got

    def span(self, name: str) -> readahead.Span:
        """Where ``name``'s bytes lie in the file, for the background read-ahead helper (page-cache hints)."""
        e = self.entries[name]
        return readahead.Span(0, self._fd(), e.start, e.nbytes)

    def prefetch(self, name: str):
        """Ask the kernel to read ``name``'s bytes ahead asynchronously (used when no helper thread runs)."""
        if hasattr(os, "posix_fadvise"):
            e = self.entries[name]
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd(), e.start, e.nbytes, os.POSIX_FADV_WILLNEED)

    def read(self, name: str, dtype=None, device=None) -> torch.Tensor:
        """An owned copy of ``name`` in ``dtype`` on ``device``: same-dtype CPU reads go straight into the
        result, others through a small staging buffer (cast / device copy per chunk)."""
        e = self.entries[name]
        src = ST_DTYPES[e.dtype]
        dst = torch.empty(e.shape, dtype=dtype or src, device=device or "cpu")
        if e.nbytes == 0:
            return dst
        if dst.dtype == src and dst.device.type == "cpu":
            self._read_into(dst.data_ptr(), e.start, e.nbytes)
        else:
            if self._staging is None:
                self._staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8)
            item = itemsize(e.dtype)
            per = _STAGING_BYTES // item
            flat = dst.view(-1)
            for i in range(0, flat.numel(), per):
                k = min(per, flat.numel() - i)
                self._read_into(self._staging.data_ptr(), e.start + i * item, k * item)
                flat[i:i + k].copy_(self._staging[:k * item].view(src))
        self._check_unchanged(name)
        return dst

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        self._staging = None
