"""GGML tensor types (the data of GGUF files): block layouts, torch dequantization, MXFP4 re-packing.

Facts: ../shared/docs/lora_gguf_reasoner.md §2 and the block layouts of ggml (``ggml-common.h``); the results are
checked bit for bit against ``gguf.quants.dequantize`` (the gguf package's numpy reference) in tests/test_gguf.py.
No gguf import here: this runs at forward time, on the compute device, per layer.

A quantized tensor is stored row by row: a logical ``[..., n]`` tensor is ``[..., n / B · S]`` bytes, ``B`` values
per block of ``S`` bytes (:data:`TYPES`). Every result is computed in float32 with the reference's order of
operations (so it is bit-identical) and then cast once to the requested dtype.

Block layouts (little-endian; ``f16(x)`` = an IEEE half; element ``j`` of a block):

* ``Q8_0`` (32 / 34): ``d f16, q int8[32]``: ``d·q[j]``.
* ``Q4_0`` (32 / 18): ``d f16, qs[16]``: ``q = qs[j] & 15`` for j < 16, ``qs[j−16] >> 4`` after; ``d·(q − 8)``.
  ``Q4_1`` (32 / 20): ``d, m f16, qs[16]``: ``d·q + m``.
* ``Q5_0`` (32 / 22): ``d f16, qh u32, qs[16]``: 5th bit = bit j of qh; ``d·(q − 16)``. ``Q5_1`` (32 / 24):
  ``d, m, qh, qs``: ``d·q + m``.
* K-quants, 256 values per super-block: ``Q2_K`` (84: scales[16] = 4-bit scale | 4-bit min per 16, qs[64] 2-bit,
  d, dmin), ``Q3_K`` (110: hmask[32], qs[64] 2-bit, 12 bytes of 6-bit signed scales per 16, d), ``Q4_K`` (144: d,
  dmin, 12 bytes of 6-bit scales + mins per 32, qs[128]), ``Q5_K`` (176: as Q4_K + qh[32]), ``Q6_K`` (210:
  ql[128], qh[64], int8 scales[16] per 16, d).
* ``MXFP4`` (GGML type 39, 32 / 17): ``e`` (E8M0) then ``qs[16]`` with element j in the **low nibble of byte j**
  and element j + 16 in the high nibble; value = E2M1(code) · 2^(e − 127) (ggml computes ``2^(e−128)`` times the
  doubled E2M1 value, which is the same number, and 2^127 for e = 255 instead of inf). The diffusers / HF layout
  used by :class:`lens_core.quant.PackedExperts` stores the scale separately and element 2i in the low nibble of
  byte i: :func:`mxfp4_to_hf` converts one into the other (a pure byte permutation, nothing dequantized).
"""
from __future__ import annotations

import functools

from .lazy_torch import torch

#: name → (GGML type id, values per block, bytes per block)
TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "BF16": (30, 1, 2),
    "MXFP4": (39, 32, 17),
}
BY_ID = {v[0]: k for k, v in TYPES.items()}
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = tuple(k for k in TYPES if k not in FLOAT_TYPES)
_FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}   # torch dtype names (lazy torch)

# Names of GGML types this reader does not load (for error messages; ids from ggml.h).
OTHER_TYPE_NAMES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 40: "NVFP4", 41: "Q1_0"}


def type_name(type_id: int) -> str:
    return BY_ID.get(type_id) or OTHER_TYPE_NAMES.get(type_id) or f"unknown type {type_id}"


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of ``n`` values (``n`` must be a multiple of the block size)."""
    _, block, size = TYPES[qtype]
    if n % block:
        raise ValueError(f"GGML {qtype}: a row of {n} values is not a multiple of the block size {block}")
    return n // block * size


def _f16(b: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` bytes → ``[n, 1]`` float32 (half → float is exact)."""
    return b.contiguous().view(torch.float16).float()


@functools.lru_cache(maxsize=None)
def _shifts(values: tuple, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """``[n, groups·32]`` bytes → 4-bit codes ``[n, groups, 64]``: per group of 32 bytes, the 32 low nibbles then
    the 32 high nibbles (the K-quant / ``Q4_0`` order; ``Q4_0`` uses ``groups`` = 1 over 16 bytes)."""
    n = qs.shape[0]
    width = qs.shape[1] // groups
    s = _shifts((0, 4), str(qs.device)).view(1, 1, 2, 1)
    return ((qs.reshape(n, groups, 1, width) >> s) & 15).reshape(n, groups, 2 * width)


def _bits(b: torch.Tensor, width: int, step: int) -> torch.Tensor:
    """``[n, m]`` bytes → ``[n, 8/step, m]``: field k (``step`` bits, mask ``2^step − 1``) of every byte."""
    n, m = b.shape
    s = _shifts(tuple(range(0, 8, step)), str(b.device)).view(1, -1, 1)
    return (b.reshape(n, 1, m) >> s) & ((1 << width) - 1)


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return b[:, 2:34].contiguous().view(torch.int8).float() * d


def _q4_0(b):
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:18], 1).reshape(-1, 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:20], 1).reshape(-1, 32).float()
    return d * q + m


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian u32 → ``[n, 32]`` bit j."""
    n = qh.shape[0]
    s = _shifts(tuple(range(8)), str(qh.device)).view(1, 1, 8)
    return ((qh.reshape(n, 4, 1) >> s) & 1).reshape(n, 32)


def _q5_0(b):
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 6:22], 1).reshape(-1, 32) | (_high_bits32(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:24], 1).reshape(-1, 32) | (_high_bits32(b[:, 4:8]) << 4)
    return d * q.float() + m


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 15).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    s = _shifts((0, 2, 4, 6), str(b.device)).view(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> s) & 3).view(n, 16, 16).float()
    return (dl * q - ml).view(n, 256)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, sc, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(sc[:, 0:8], 4, 4).reshape(n, 16)           # [n, 2, 8]: scale i + 8k = nibble k of byte i
    high = _bits(sc[:, 8:12], 2, 2).reshape(n, 16)         # [n, 4, 4]: 2-bit field k of byte 8 + i
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    s = _shifts((0, 2, 4, 6), str(b.device)).view(1, 1, 4, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> s) & 3).view(n, 16, 16)
    qh = _bits(hmask, 1, 1).reshape(n, 16, 16) ^ 1            # [n, 8, 32]: bit k of byte j
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).view(n, 256)


def _k_scales(b):
    """Per-32 scale ``d·sc`` and min ``dmin·m`` ``[n, 8, 1]`` of a ``Q4_K`` / ``Q5_K`` super-block (bytes 0-15:
    d, dmin, then 12 bytes packing eight 6-bit scales and eight 6-bit mins)."""
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    a, m, md = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    sc = torch.cat([a & 63, (md & 15) | ((a >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return (d * sc.float()).view(n, 8, 1), (dmin * mn.float()).view(n, 8, 1)


def _q4_k(b):
    dl, ml = _k_scales(b)
    q = _nibbles(b[:, 16:144], 4).reshape(-1, 8, 32).float()
    return (dl * q - ml).view(-1, 256)


def _q5_k(b):
    dl, ml = _k_scales(b)
    ql = _nibbles(b[:, 48:176], 4).reshape(-1, 8, 32)
    qh = _bits(b[:, 16:48], 1, 1).reshape(-1, 8, 32)
    return (dl * (ql | (qh << 4)).float() - ml).view(-1, 256)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    low = _nibbles(ql, 2).reshape(n, 256)                   # per 64 bytes: 64 low nibbles, then 64 high
    s = _shifts((0, 2, 4, 6), str(b.device)).view(1, 1, 4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> s) & 3).reshape(n, 256)
    q = ((low | (high << 4)).to(torch.int8) - 32).view(n, 16, 16).float()
    return (d * q).view(n, 256)


# E2M1 values doubled (exact small integers), as ggml's table; the scale below is halved to match.
_E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """E8M0 byte → float32 ``2^(e − 128)`` (ggml: subnormal bit patterns for e < 2, 2^127 for e = 255)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e), (e - 1) << 23)
    return bits.view(torch.float32)


@functools.lru_cache(maxsize=None)
def _e2m1_doubled(device: str) -> torch.Tensor:
    return torch.tensor(_E2M1_DOUBLED, dtype=torch.float32, device=device)


def _mxfp4(b):
    d = _e8m0_half(b[:, 0:1])
    codes = _nibbles(b[:, 1:17], 1).reshape(-1).int()
    q = _e2m1_doubled(str(b.device)).index_select(0, codes).view(-1, 32)
    return d * q


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
            "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "MXFP4": _mxfp4}


def dequantize(data: torch.Tensor, qtype: str, shape, dtype=None) -> torch.Tensor:
    """GGML bytes of a logical ``shape`` tensor (uint8, any shape with that many bytes, any device) → ``shape``
    in ``dtype`` (default float32) on ``data``'s device. Float types are reinterpreted; quantized ones are
    computed in float32."""
    dtype = torch.float32 if dtype is None else dtype
    if qtype not in TYPES:
        raise ValueError(f"GGML type {qtype!r} is not supported; supported: {list(TYPES)}")
    shape = tuple(int(s) for s in shape)
    _, block, size = TYPES[qtype]
    numel = 1
    for s in shape:
        numel *= s
    if not shape or shape[-1] % block or data.numel() != numel // block * size:
        raise ValueError(f"GGML {qtype}: {data.numel()} bytes do not hold a {list(shape)} tensor "
                         f"({block} values per {size}-byte block, rows must be whole blocks)")
    if data.dtype != torch.uint8:
        raise ValueError(f"GGML {qtype}: expected uint8 bytes, found {data.dtype}")
    flat = data.reshape(-1)
    if qtype in _FLOAT_DTYPES:
        out = flat.view(getattr(torch, _FLOAT_DTYPES[qtype]))
        return out.view(shape).to(dtype)
    blocks = flat.view(-1, size)
    return _DEQUANT[qtype](blocks).view(shape).to(dtype)


def mxfp4_to_hf(data: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML MXFP4 bytes of ``[..., rows, cols]`` → (blocks ``[..., rows, cols/32, 16]`` with element 2i in the low
    nibble of byte i, E8M0 scales ``[..., rows, cols/32]``): the layout of :class:`lens_core.quant.PackedExperts`
    (diffusers ``*_blocks`` / ``*_scales``). A byte permutation; no value is decoded."""
    if cols % 32:
        raise ValueError(f"MXFP4: a row of {cols} values is not a multiple of 32")
    g = cols // 32
    b = data.reshape(-1, rows, g, 17)
    scales = b[..., 0].contiguous()
    qs = b[..., 1:]
    lo, hi = qs & 15, qs >> 4                                    # elements 0..15 and 16..31
    codes = torch.cat([lo, hi], dim=-1)                          # element order
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    lead = data.shape[:-2] if data.dim() >= 2 else ()
    return blocks.reshape(*lead, rows, g, 16), scales.reshape(*lead, rows, g)


def hf_to_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`mxfp4_to_hf`: ``[..., rows, G, 16]`` + ``[..., rows, G]`` → GGML bytes
    ``[..., rows, G·17]`` (used by the test fixtures and the benchmark to write GPT-OSS GGUF files)."""
    lo, hi = blocks & 15, blocks >> 4
    codes = torch.stack([lo, hi], dim=-1).flatten(-2)            # [..., G, 32] element order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = torch.cat([scales.unsqueeze(-1), qs], dim=-1)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 17)
