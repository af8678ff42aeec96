"""GGUF reading: one strict, bounded walk of the header gives the metadata and the tensor index; the data is
read with positioned reads like safetensors (a file changing while read is an error, never SIGBUS) and
dequantized in torch (:mod:`lens_core.ggml`). No third-party package is used at run time; tests check the index against ``gguf.GGUFReader`` (ggml's own reader) on the files they write.

Facts: ../shared/docs/lora_gguf_reasoner.md §2. Layout (GGUF v2/v3, little-endian): ``"GGUF"``, u32 version,
u64 tensor count, u64 key/value count, the key/values (u64-length strings, u32 value type, value; arrays = u32
item type + u64 count + items), the tensor infos (name, u32 n_dims, u64 dims innermost first, u32 GGML type, u64
offset relative to the data section), padding to ``general.alignment`` (default 32), the data section.

Why not ``gguf.GGUFReader`` at run time (it was the first design): it builds one numpy object per metadata array
item, and a real GPT-OSS GGUF carries its 201,088-token vocabulary and ~446k merges as string arrays: opening
such a header took 139 s and +0.9 GB RSS with GGUFReader against 4 s and no lasting memory for this walk
(measured on the 2-core machine under load, notes/issue15). It also trusts counts (an array count beyond the
end of the file makes it loop on empty reads). :func:`_check_structure` walks the whole header with every
length and count bounded by the bytes left, long arrays skipped (summarized in ``metadata``), nested arrays
refused, dims/types/offsets checked (offsets aligned and inside the file, element counts bounded, rows made of
whole blocks, no two tensors overlapping).
"""
from __future__ import annotations

import os
import struct

from ..lazy_torch import torch

from .. import checks as chk
from .. import ggml
from .errors import CheckpointError
from .weightfile import TensorEntry, WeightFile

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME = 1 << 16
MAX_ELEMENTS = 1 << 48
MAX_SMALL_ARRAY = 64          # arrays up to this length are kept in ``metadata``; longer ones are summarized

# GGUF value types: id → (struct format or None, size)
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


def is_gguf(path) -> bool:
    """Whether ``path`` begins with the GGUF magic (content detection, never the file name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class _Walker:
    """Bounded reads over the mapped header; every failure is a CheckpointError naming the file."""

    def __init__(self, path, f, size):
        self.path, self.f, self.size, self.pos = path, f, size, 0
        self.buf = bytearray()
        self._grow(min(size, 1 << 20))

    def _grow(self, upto):
        """Read the file up to byte ``upto`` (plain reads, doubling; never past the file size)."""
        want = min(self.size, max(upto, 2 * len(self.buf)))
        if want > len(self.buf):
            self.f.seek(len(self.buf))
            more = self.f.read(want - len(self.buf))
            if len(self.buf) + len(more) < upto:
                self.fail(f"the file ended at byte {len(self.buf) + len(more)} while it was read (it changed)")
            self.buf += more

    def fail(self, what):
        raise CheckpointError(f"{self.path}: invalid GGUF header: {what} (at byte {self.pos} of {self.size}); the "
                              f"file is truncated or corrupt (re-download it)")

    def take(self, n, what):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} left")
        if self.pos + n > len(self.buf):
            self._grow(self.pos + n)
        a = self.pos
        self.pos += n
        return a

    def unpack(self, fmt, size, what):
        a = self.take(size, what)
        return struct.unpack_from(fmt, self.buf, a)[0]

    def string(self, what, limit=None):
        n = self.unpack("<Q", 8, f"{what} length")
        if limit is not None and n > limit:
            self.fail(f"{what} of {n} bytes (limit {limit})")
        a = self.take(n, what)
        return a, n

    def text(self, what, limit=MAX_NAME):
        a, n = self.string(what, limit)
        try:
            return bytes(self.buf[a:a + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype, what, depth=0):
        """The value (small ones) or a summary string (long arrays), advancing past it."""
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.unpack(fmt, size, what)
        if vtype == _STRING:
            a, n = self.string(what)
            if n > 4096:
                return f"<string of {n} bytes>"
            return bytes(self.buf[a:a + n]).decode("utf-8", errors="replace")
        if vtype == _ARRAY:
            if depth:
                self.fail(f"{what}: nested arrays are not supported")
            itype = self.unpack("<I", 4, f"{what} item type")
            count = self.unpack("<Q", 8, f"{what} item count")
            if itype in _SCALARS:
                size = _SCALARS[itype][1]
                if count * size > self.size - self.pos:
                    self.fail(f"{what}: {count} items of {size} bytes exceed the file")
                if count <= MAX_SMALL_ARRAY:
                    return [self.value(itype, what, 1) for _ in range(count)]
                self.take(count * size, what)
                return f"<array of {count} numbers>"
            if itype == _STRING:
                if count * 8 > self.size - self.pos:
                    self.fail(f"{what}: {count} strings exceed the file")
                if count <= MAX_SMALL_ARRAY:
                    return [self.value(itype, what, 1) for _ in range(count)]
                for _ in range(count):
                    self.string(what)
                return f"<array of {count} strings>"
            self.fail(f"{what}: unsupported array item type {itype}")
        self.fail(f"{what}: unknown value type {vtype}")


def _check_structure(path, f, size):
    """Walk the header of the open file ``f`` (see the module docstring). Returns (version, metadata, tensor
    infos, data start)."""
    w = _Walker(path, f, size)
    if size < 24 or bytes(w.buf[:4]) != MAGIC:
        raise CheckpointError(f"{path}: expected a GGUF file (magic 'GGUF' + 20 header bytes), found "
                              f"{bytes(w.buf[:4])!r} in a {size}-byte file")
    w.pos = 4
    version = w.unpack("<I", 4, "version")
    if version & 0xFFFF == 0 and version:
        raise CheckpointError(f"{path}: a big-endian GGUF file; only little-endian GGUF is supported")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = w.unpack("<Q", 8, "tensor count")
    n_kv = w.unpack("<Q", 8, "key/value count")
    if n_kv * 13 > size - w.pos:      # key length (8) + type (4) + at least 1 byte
        w.fail(f"{n_kv} key/value pairs cannot fit")
    metadata = {}
    for _ in range(n_kv):
        key = w.text("metadata key")
        vtype = w.unpack("<I", 4, f"type of {key!r}")
        if key in metadata:
            w.fail(f"duplicate metadata key {key!r}")
        metadata[key] = w.value(vtype, f"metadata {key!r}")
    if n_tensors * 25 > size - w.pos:  # name length + n_dims + 1 dim + type + offset
        w.fail(f"{n_tensors} tensor infos cannot fit")
    infos = []
    names = set()
    for _ in range(n_tensors):
        name = w.text("tensor name")
        if name in names:
            w.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = w.unpack("<I", 4, f"{name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            w.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1..{MAX_DIMS})")
        dims = [w.unpack("<Q", 8, f"{name!r} dims") for _ in range(n_dims)]
        type_id = w.unpack("<I", 4, f"{name!r} type")
        offset = w.unpack("<Q", 8, f"{name!r} offset")
        infos.append((name, dims, type_id, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > 1 << 20:
        raise CheckpointError(f"{path}: general.alignment must be a power of two up to 1 MiB, found {alignment!r}")
    data_start = -(-w.pos // alignment) * alignment
    spans = []
    for name, dims, type_id, offset in infos:
        qtype = ggml.BY_ID.get(type_id)
        if qtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as GGML type {ggml.type_name(type_id)}, which "
                                  f"this loader does not support; supported: {list(ggml.TYPES)}")
        numel = 1
        for d in dims:
            if d < 1 or d > MAX_ELEMENTS:
                raise CheckpointError(f"{path}: tensor {name!r} has dimension {d} (dims {dims}); corrupt file")
            numel *= d
        if numel > MAX_ELEMENTS:
            raise CheckpointError(f"{path}: tensor {name!r} has {numel} elements (dims {dims}); corrupt file")
        _, block, bsize = ggml.TYPES[qtype]
        if dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name!r} ({qtype}) has rows of {dims[0]} values, not a multiple "
                                  f"of the {qtype} block size {block}; corrupt file")
        nbytes = numel // block * bsize
        if offset % alignment:
            raise CheckpointError(f"{path}: tensor {name!r} data offset {offset} is not aligned to {alignment}")
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(f"{path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + nbytes}"
                                  f", the file has {size} (incomplete download?)")
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CheckpointError(f"{path}: tensors {an!r} and {bn!r} overlap in the data section; corrupt file")
    return version, metadata, infos, data_start


class GGUFFile(WeightFile):
    """One GGUF file (:class:`WeightFile`: entries, read, span, prefetch, close; a sibling of SafetensorsFile).

    ``entries[name].dtype`` is the GGML type name (``F16``, ``Q4_K``, ``MXFP4`` …) and ``.shape`` the logical
    (PyTorch-order) shape; :meth:`read` returns values (dequantized in torch when quantized), :meth:`read_bytes`
    the stored bytes ``[*shape[:-1], row bytes]`` for layers that stay quantized."""

    format = "gguf"

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise chk.missing_path(self.path, thing="file")
        with open(self.path, "rb") as f:
            self._opened(os.fstat(f.fileno()))
            if self.size < 24:
                raise CheckpointError(f"{self.path}: expected a GGUF file, found a {self.size}-byte file")
            self.version, walked_md, infos, self.data_start = _check_structure(self.path, f, self.size)
        self.entries: dict[str, TensorEntry] = {}
        for name, dims, type_id, offset in infos:
            qtype = ggml.BY_ID[type_id]
            shape = tuple(reversed(dims))
            start = self.data_start + offset
            numel = 1
            for d in dims:
                numel *= d
            self.entries[name] = TensorEntry(name, qtype, shape, start,
                                             start + numel // dims[0] * ggml.row_bytes(qtype, dims[0]))
        self.metadata = walked_md
        self.architecture = walked_md.get("general.architecture")
        if self.architecture is not None and not isinstance(self.architecture, str):
            raise CheckpointError(f"{self.path}: general.architecture must be a string, found "
                                  f"{self.architecture!r}")

    def is_quantized(self, name: str) -> bool:
        return self.entries[name].dtype not in ggml.FLOAT_TYPES

    def read_bytes(self, name: str, device=None) -> torch.Tensor:
        """An owned copy of the stored bytes (uint8 ``[*shape[:-1], row bytes]``) on ``device``."""
        e = self.entries[name]
        rows = ggml.row_bytes(e.dtype, e.shape[-1])
        data = torch.empty(*e.shape[:-1], rows, dtype=torch.uint8)
        self._read_into(data.data_ptr(), e.start, e.nbytes)
        self._check_unchanged(name)
        return data if device is None or torch.device(device).type == "cpu" else data.to(device)

    def read(self, name: str, dtype=None, device=None) -> torch.Tensor:
        """Values of ``name`` in ``dtype`` (default: the stored float dtype, float32 for quantized types)."""
        e = self.entries[name]
        if e.dtype in ggml.FLOAT_TYPES:
            return super().read(name, dtype, device)
        data = self.read_bytes(name, device)
        return ggml.dequantize(data, e.dtype, e.shape, dtype or torch.float32)
