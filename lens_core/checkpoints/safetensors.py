"""safetensors reading: a header validated as strictly as the reference library, tensor-by-tensor positioned reads."""
from __future__ import annotations

import json
import math
import os

from .. import checks as chk
from .errors import CheckpointError
from .weightfile import ST_DTYPES, ST_ITEMSIZE, ST_NAMES, TensorEntry, WeightFile, itemsize as _itemsize  # noqa: F401 (re-exported)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


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


class SafetensorsFile(WeightFile):
    """One safetensors file: parsed and validated header, tensor-by-tensor positioned reads (:class:`WeightFile`).

    Tensor bytes are read with plain reads (no memory map): a file that shrinks or is rewritten while it is read
    (a download still running, a full disk, a file replaced in place) gives a :class:`CheckpointError` naming it,
    never a SIGBUS that kills the process (which is what touching a vanished page of a memory map does).
    """

    format = "safetensors"

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise chk.missing_path(self.path, thing="file")
        low = self.path.lower()
        if low.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{self.path}: a pickle checkpoint ({os.path.splitext(low)[1]}) is refused "
                                  f"(safetensors only: pickles can run code); convert it or download the "
                                  f".safetensors version")
        with open(self.path, "rb") as f:
            self._opened(os.fstat(f.fileno()))
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
