"""safetensors reading: parsed and validated header, memory-mapped data, tensor-by-tensor reads."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os

import torch

from .. import readahead
from .errors import CheckpointError


ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
if hasattr(torch, "float8_e8m0fnu"):
    ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_PAGE = mmap.PAGESIZE


@dataclasses.dataclass
class TensorEntry:
    name: str           # key as stored in the file
    dtype: str          # safetensors dtype name
    shape: tuple
    start: int          # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _describe_foreign_file(path: str, head: bytes) -> str:
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "a pickle / torch.save file"
    if head[:4] == b"GGUF":
        return "a GGUF file"
    return f"a file whose first bytes are {head[:8]!r}"


class SafetensorsFile:
    """One safetensors file: parsed and validated header, memory-mapped data, tensor-by-tensor reads."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        low = self.path.lower()
        if low.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{self.path}: a pickle checkpoint ({os.path.splitext(low)[1]}) is refused "
                                  f"(safetensors only: pickles can run code); convert it or download the "
                                  f".safetensors version")
        self.size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(9)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: expected a safetensors file, found a {self.size}-byte file "
                                      f"(truncated or empty)")
            n = int.from_bytes(head[:8], "little")
            length_ok = 1 < n <= 100_000_000 and 8 + n <= self.size
            # A real header length can begin with any byte (0x80, "PK", ...), so the foreign-format
            # signatures are only consulted when the bytes do not read as a safetensors header.
            if not (length_ok and head[8:9] == b"{") and (head[:4] == b"GGUF" or head[:2] == b"PK" or head[:1] == b"\x80"):
                raise CheckpointError(f"{self.path}: expected a safetensors file, found "
                                      f"{_describe_foreign_file(self.path, head)}; only safetensors is loaded")
            if not length_ok:
                raise CheckpointError(f"{self.path}: expected a safetensors header of {n} bytes after the 8-byte "
                                      f"length, found a {self.size}-byte file (truncated or not safetensors)")
            f.seek(8)
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}: expected a JSON safetensors header, found unreadable bytes "
                                  f"({exc}); the file is corrupt or not safetensors") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: expected a JSON object as safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for name, e in header.items():
            try:
                dtype, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for tensor {name!r}") from None
            if dtype not in ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            itemsize = torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
            if b - a != math.prod(shape) * itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r} {dtype}{list(shape)} needs "
                                      f"{math.prod(shape) * itemsize} bytes, header gives {b - a}; corrupt file")
            self.entries[name] = TensorEntry(name, dtype, shape, self.data_start + a, self.data_start + b)
        end = max((e.end for e in self.entries.values()), default=self.data_start)
        if end > self.size:
            raise CheckpointError(f"{self.path}: truncated safetensors file: the header describes "
                                  f"{end} bytes, the file has {self.size} (incomplete download?)")
        self._mm = None

    # -- data access -------------------------------------------------------------------------------
    def _map(self):
        if self._mm is None:
            self._file = open(self.path, "rb")  # kept open for posix_fadvise read-ahead hints
            # private copy-on-write mapping: writable for torch.frombuffer, never written
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self._base = torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr() if self.size else 0
        return self._mm

    def span(self, name: str) -> readahead.Span:
        """Where ``name``'s bytes are mapped, for the background read-ahead helper."""
        e = self.entries[name]
        self._map()
        return readahead.Span(self._base, self._file.fileno(), e.start, e.nbytes)

    def raw(self, name: str) -> torch.Tensor:
        """A tensor viewing the mapped bytes of ``name`` (valid until :meth:`close`; do not keep it)."""
        e = self.entries[name]
        dtype = ST_DTYPES[e.dtype]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        buf = torch.frombuffer(self._map(), dtype=torch.uint8, count=e.nbytes, offset=e.start)
        return buf.view(dtype).view(e.shape)

    def prefetch(self, name: str):
        """Ask the kernel to read ``name``'s bytes ahead asynchronously (large I/O instead of page faults)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        mm = self._map()
        e = self.entries[name]
        a = (e.start // _PAGE) * _PAGE
        if e.end > a:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_WILLNEED, a, e.end - a)

    def release(self, name: str):
        """Drop the mapped pages of ``name`` from this process (they are re-read on demand)."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        e = self.entries[name]
        a = (e.start // _PAGE) * _PAGE
        b = min(self.size, -(-e.end // _PAGE) * _PAGE)
        if b > a:
            with contextlib.suppress(OSError, ValueError):
                self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def read(self, name: str, dtype=None, device=None) -> torch.Tensor:
        """An owned copy of ``name`` in ``dtype`` on ``device``, read straight from the mapping."""
        src = self.raw(name)
        dst = torch.empty(src.shape, dtype=dtype or src.dtype, device=device or "cpu")
        dst.copy_(src)
        del src
        self.release(name)
        return dst

    def close(self):
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
            self._file.close()
