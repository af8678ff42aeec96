"""safetensors reading: a header validated as strictly as the reference library, tensor-by-tensor positioned reads."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
from collections.abc import Mapping

from .. import checks as chk
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

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


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


_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"RIFF", "a RIFF (WebP/WAV) file"), (b"\x89HDF", "an HDF5 (.h5) file"), (b"GGUF", "a GGUF file"),
               (b"\x1f\x8b", "a gzip file"), (b"7z\xbc\xaf", "a 7-zip archive"), (b"%PDF", "a PDF document"))


def _describe_foreign_file(path: str, head: bytes) -> str:
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "a pickle / torch.save file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head[:1] in (b"{", b"[") or (head and all(32 <= c < 127 or c in (9, 10, 13) for c in head)):
        return f"a text file starting with {head[:16]!r}"
    return f"a file whose first bytes are {head[:8]!r}"


MAX_HEADER_BYTES = 100_000_000   # the reference library's limit (safetensors' MAX_HEADER_SIZE)
_READ_CHUNK = 1 << 30            # bytes per read call (Linux reads at most ~2 GiB at once)
_STAGING_BYTES = 16 << 20        # staging buffer for reads that cast or go to another device


def _dup_checked(pairs):
    """JSON object hook: a key given twice is refused (which value would be meant is ambiguous)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _itemsize(dtype: str) -> int:
    return ST_ITEMSIZE[dtype]


def parse_header(path: str, raw: bytes, data_size: int) -> tuple[dict, dict[str, tuple]]:
    """(metadata, {name: (dtype, shape, start, end)}) from the JSON header bytes of a safetensors file whose data
    section holds ``data_size`` bytes; offsets are relative to the data section.

    The rules of the reference library (huggingface/safetensors ``Metadata::validate``), checked before any tensor
    byte is used: UTF-8 JSON object starting with ``{``; ``__metadata__`` a string→string map; every entry has a
    known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` [begin, end] of non-negative
    integers; sorted by offset the entries cover the data section contiguously (no gap, no overlap, begin ≤ end);
    each entry's size is exactly dtype size × shape; the last end equals the data size (no truncation, no trailing
    bytes). Stricter than the reference: a key given twice is refused.
    """
    def bad(what: str):
        return CheckpointError(f"{path}: invalid safetensors header: {what}; the file is corrupt, truncated or "
                               f"crafted. Fix: download it again (compare its size / SHA-256 with the source)")

    if not raw[:1] == b"{":
        raise bad(f"expected a JSON object starting with '{{', found {raw[:8]!r}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_dup_checked)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"expected UTF-8 JSON, found unreadable bytes ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise bad(f"expected a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("expected '__metadata__' to map strings to strings")
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict):
            raise bad(f"tensor {name!r}: expected an object with dtype, shape, data_offsets, found "
                      f"{type(e).__name__}")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
            raise bad(f"tensor {name!r}: expected a dtype among {sorted(ST_ITEMSIZE)}, found {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise bad(f"tensor {name!r}: expected a shape of non-negative integers, found {shape!r:.80}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise bad(f"tensor {name!r}: expected data_offsets [begin, end] of non-negative integers, found "
                      f"{offsets!r:.80}")
        begin, end = offsets
        need = math.prod(shape) * _itemsize(dtype)
        if end < begin or end - begin != need:
            raise bad(f"tensor {name!r} {dtype}{shape}: expected {need} bytes (dtype size x shape), data_offsets "
                      f"{offsets} give {end - begin}")
        entries[name] = (dtype, tuple(shape), begin, end)
    cursor = 0
    for name, (_d, _s, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap after the previous tensor"
            raise bad(f"tensor {name!r}: data_offsets begin at {begin}, expected {cursor} (it {what}; tensors "
                      f"must cover the data section contiguously)")
        cursor = end
    if cursor != data_size:
        if cursor > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: the header describes {cursor} data bytes, "
                                  f"the file holds {data_size} (incomplete download or full disk?). Fix: download "
                                  f"it again")
        raise bad(f"the tensors end at data byte {cursor}, the file has {data_size - cursor} bytes more "
                  f"(expected the data section to end with the last tensor)")
    return metadata, entries


class SafetensorsFile:
    """One safetensors file: parsed and validated header, tensor-by-tensor positioned reads.

    Tensor bytes are read with plain reads (no memory map): a file that shrinks or is rewritten while it is read
    (a download still running, a full disk, a file replaced in place) gives a :class:`CheckpointError` naming it,
    never a SIGBUS that kills the process (which is what touching a vanished page of a memory map does).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise chk.link_problem(self.path) or FileNotFoundError(f"{self.path}: no such file")
        low = self.path.lower()
        if low.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{self.path}: a pickle checkpoint ({os.path.splitext(low)[1]}) is refused "
                                  f"(safetensors only: pickles can run code); convert it or download the "
                                  f".safetensors version")
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            self.size = st.st_size
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            head = f.read(16)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: expected a safetensors file, found a {self.size}-byte file "
                                      f"(truncated or empty)")
            n = int.from_bytes(head[:8], "little")
            length_ok = 1 < n <= MAX_HEADER_BYTES and 8 + n <= self.size
            # A real header length can begin with any byte (0x80, "PK", ...), so the foreign-format
            # signatures are only consulted when the bytes do not read as a safetensors header: a JSON header
            # start at byte 8 means safetensors (maybe cut short), whatever the length's first byte is.
            pickle_like = head[:2] == b"PK" or head[:1] == b"\x80"
            if (head[:4] == b"GGUF" and not length_ok) or (pickle_like and head[8:9] != b"{"):
                raise CheckpointError(f"{self.path}: expected a safetensors file, found "
                                      f"{_describe_foreign_file(self.path, head)}; only safetensors is loaded")
            if not length_ok and head[8:9] != b"{":
                # the first 8 bytes do not read as a header length: another kind of file, not a damaged one
                raise CheckpointError(f"{self.path}: expected a safetensors file (an 8-byte header length, then a "
                                      f"JSON header), found {_describe_foreign_file(self.path, head)} of "
                                      f"{self.size} bytes; only safetensors is loaded")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{self.path}: expected a safetensors header of at most {MAX_HEADER_BYTES} "
                                      f"bytes, the length field says {n} (corrupt or not safetensors)")
            if not length_ok:
                raise CheckpointError(f"{self.path}: expected a safetensors header of {n} bytes after the 8-byte "
                                      f"length, found a {self.size}-byte file (truncated or not safetensors)")
            f.seek(8)
            raw = f.read(n)
        if len(raw) != n:
            self._changed()
        self.data_start = 8 + n
        self.metadata, parsed = parse_header(self.path, raw, self.size - self.data_start)
        self.entries: dict[str, TensorEntry] = {
            name: TensorEntry(name, dtype, shape, self.data_start + a, self.data_start + b)
            for name, (dtype, shape, a, b) in parsed.items()}
        self._file = None
        self._staging = None

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
            item = _itemsize(e.dtype)
            per = _STAGING_BYTES // item
            flat = dst.view(-1)
            for i in range(0, flat.numel(), per):
                k = min(per, flat.numel() - i)
                self._read_into(self._staging.data_ptr(), e.start + i * item, k * item)
                flat[i:i + k].copy_(self._staging[:k * item].view(src))
        st = os.fstat(self._file.fileno())
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            self._changed(f" (after reading tensor {name!r})")
        return dst

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        self._staging = None
