"""Benchmark of GGUF loading (issue 15): real-size resident memory / peak RSS, and per-layer dequantization cost.

``--mode memory`` writes random real-shape GGUF files to ``--dir`` (streamed, one tensor at a time) and loads
each in a fresh process (``load_transformer`` / ``load_text_encoder``, bf16), recording the resident bytes of
the module (parameters + buffers), the RSS after loading and the peak RSS of that process:

* ``dit-q4k`` / ``dit-q8`` / ``dit-q6k``: the real Lens DiT (48 blocks, 1264 tensors, the real names and shapes) in
  the stable-diffusion.cpp layout: no ``general.architecture``; biases, ``img_in``, ``txt_in``, 64-wide norms and
  rows that are not whole blocks stay F16; everything else in the type;
* ``te``: GPT-OSS-20B as an unsloth/ggml-org GGUF: ``token_embd`` / ``output`` / attention F16, norms, sinks,
  router and expert biases F32, the 3×24 expert banks MXFP4 (GGML type 39).

The quantized bytes are random (any bytes are valid blocks; the memory figures do not depend on them).
Files are deleted at the end unless ``--keep``. Needs ≈ 14 GB free disk for ``te`` and ≈ 14 GB free RAM.

``--mode layer`` times one real-size DiT Linear at ``--tokens`` image tokens (1024² = 4096) with bf16 input:
a plain bf16 ``nn.Linear`` against :class:`lens_core.quant_linear.GGUFLinear` in each ``--types`` (weights
from quantizing the same random matrix; dequantization per call), and the dequantization alone.
"""
from __future__ import annotations

import json
import os
import struct
import time

import torch

from lens_core import ggml
from lens_core.bench import median_time

KEEP = (".bias", ".scale", "img_in.", "txt_in.", "time_in.", "final_layer.", "embedding")


def add_arguments(parser):
    parser.add_argument("--mode", choices=["memory", "layer"], default="memory")
    parser.add_argument("--dir", default="/tmp/lens_gguf_bench", help="where the random GGUF files are written")
    parser.add_argument("--kinds", default="dit-q4k,dit-q8,te")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--tokens", type=int, default=4096, help="layer mode: tokens per forward (1024² = 4096)")
    parser.add_argument("--types", default="Q8_0,Q6_K,Q5_K,Q4_K", help="layer mode: GGML types to time")
    parser.add_argument("--te-layers", type=int, default=24,
                        help="memory mode, te: load layers 0..N-1 only (features of layer N-1) when RAM is short")


# --------------------------------------------------------------------------------------------------
# a streaming GGUF writer (header, key/values, tensor infos, then data tensor by tensor)
# --------------------------------------------------------------------------------------------------
def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, value) -> bytes:
    if isinstance(value, list):         # array of strings (tokenizer vocabularies)
        return _s(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_s(v) for v in value)
    if isinstance(value, str):
        return _s(key) + struct.pack("<I", 8) + _s(value)
    if isinstance(value, float):
        return _s(key) + struct.pack("<If", 6, value)
    return _s(key) + struct.pack("<II", 4, value)


def write_gguf(path, tensors: list, metadata: dict, alignment: int = 32, seed: int = 0) -> int:
    """``tensors``: (name, logical shape, GGML type) in file order; data = random bytes (finite ones for float
    types). Returns the file size."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=gen).numpy().tobytes()
    floats = (torch.randn(16 << 20, generator=gen) * 0.02)
    float_pool = {"F32": floats.numpy().tobytes(), "F16": floats.half().numpy().tobytes(),
                  "BF16": floats.bfloat16().view(torch.int16).numpy().tobytes()}
    infos, offset = [], 0
    for name, shape, qtype in tensors:
        n = 1
        for d in shape:
            n *= d
        nbytes = n // shape[-1] * ggml.row_bytes(qtype, shape[-1])
        dims = list(reversed(shape))
        infos.append(_s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", ggml.TYPES[qtype][0], offset))
        offset += -(-nbytes // alignment) * alignment
    kv = [_kv(k, v) for k, v in metadata.items()]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head)
        for name, shape, qtype in tensors:
            n = 1
            for d in shape:
                n *= d
            nbytes = n // shape[-1] * ggml.row_bytes(qtype, shape[-1])
            src = float_pool.get(qtype, pool)
            left = nbytes
            while left:
                chunk = min(left, len(src))
                f.write(src[:chunk])
                left -= chunk
            f.write(b"\0" * (-nbytes % alignment))
    return os.path.getsize(path)


def sdcpp_type(name: str, shape: tuple, qtype: str) -> str:
    block = ggml.TYPES[qtype][1]
    return "F16" if any(k in name for k in KEEP) or shape[-1] % block else qtype


def dit_tensors(qtype: str) -> list:
    from lens_core.benchmarks.load import real_shapes

    shapes = real_shapes()
    return [(n, shapes[n], sdcpp_type(n, shapes[n], qtype)) for n in sorted(shapes)]


def te_tensors() -> tuple[list, dict]:
    from lens_core.checkpoints import REAL_TE_CONFIG as c

    h, heads, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    e, inter, vocab = c["num_local_experts"], c["intermediate_size"], c["vocab_size"]
    t = [("token_embd.weight", (vocab, h), "F16"), ("output_norm.weight", (h,), "F32"),
         ("output.weight", (vocab, h), "F16")]
    for i in range(c["num_hidden_layers"]):
        b = f"blk.{i}."
        t += [(b + "attn_norm.weight", (h,), "F32"), (b + "post_attention_norm.weight", (h,), "F32"),
              (b + "attn_sinks.weight", (heads,), "F32")]
        for name, rows, cols in (("attn_q", heads * hd, h), ("attn_k", kv * hd, h), ("attn_v", kv * hd, h),
                                 ("attn_output", h, heads * hd)):
            t += [(f"{b}{name}.weight", (rows, cols), "F16"), (f"{b}{name}.bias", (rows,), "F32")]
        t += [(b + "ffn_gate_inp.weight", (e, h), "F32"), (b + "ffn_gate_inp.bias", (e,), "F32")]
        for name, rows, cols in (("ffn_gate_exps", inter, h), ("ffn_up_exps", inter, h), ("ffn_down_exps", h, inter)):
            t += [(f"{b}{name}.weight", (e, rows, cols), "MXFP4"), (f"{b}{name}.bias", (e, rows), "F32")]
    md = {"general.architecture": "gpt-oss", "gpt-oss.block_count": c["num_hidden_layers"],
          "gpt-oss.embedding_length": h, "gpt-oss.expert_count": e,
          "gpt-oss.expert_used_count": c["num_experts_per_tok"], "gpt-oss.attention.sliding_window": 128,
          "gpt-oss.attention.key_length": hd, "gpt-oss.rope.freq_base": 150000.0,
          "gpt-oss.attention.layer_norm_rms_epsilon": 1e-5, "gpt-oss.rope.scaling.factor": 32.0,
          "gpt-oss.rope.scaling.original_context_length": 4096,
          # vocabulary arrays of the real files' size (201,088 tokens, ~446k merges): what gguf's reader parses
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)],
          "tokenizer.ggml.merges": [f"m{i} n{i}" for i in range(446189)]}
    return t, md


_CHILD = """
import json, os, resource, sys, time
import torch
from lens_core import checkpoints as ck
kind, path, n_layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
fd = os.open(path, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
base = rss()
t0 = time.perf_counter()
if kind == "te":
    model = ck.load_text_encoder(path, dtype=torch.bfloat16, selected_layers=[n_layers - 1])
else:
    model = ck.load_transformer(path, dtype=torch.bfloat16)
dt = time.perf_counter() - t0
resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(dict(load_s=dt, resident=resident, baseline=base, after=rss(),
                      peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      family=model.lens_checkpoint.family, dtypes=model.lens_checkpoint.extra.get("dtypes"))))
"""


def _load_child(kind, path, te_layers=24) -> dict:
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind, path, str(te_layers)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(args):
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for kind in args.kinds.split(","):
        if kind == "te":
            tensors, md = te_tensors()
        elif kind in ("dit-q4k", "dit-q8", "dit-q6k"):
            tensors, md = dit_tensors({"dit-q4k": "Q4_K", "dit-q8": "Q8_0", "dit-q6k": "Q6_K"}[kind]), {}
        else:
            raise SystemExit(f"unknown kind {kind!r}")
        path = os.path.join(args.dir, f"{kind}.gguf")
        t0 = time.perf_counter()
        size = write_gguf(path, tensors, md)
        write_s = time.perf_counter() - t0
        try:
            r = _load_child(kind, path, args.te_layers)
        finally:
            if not args.keep:
                os.remove(path)
        rows.append({"file": kind if kind != "te" else f"te (layers 0-{args.te_layers - 1})", "file_GB": round(size / 1e9, 3), "write_s": round(write_s, 1),
                     "load_s": round(r["load_s"], 1), "resident_GB": round(r["resident"] / 1e9, 3),
                     "rss_after_GB": round(r["after"] / 1e9, 3), "peak_rss_GB": round(r["peak"] / 1e9, 3),
                     "peak/resident": round(r["peak"] / r["resident"], 3),
                     "baseline_GB": round(r["baseline"] / 1e9, 3),
                     "(peak-baseline)/resident": round((r["peak"] - r["baseline"]) / r["resident"], 3),
                     "family": r["family"],
                     "dtypes": r["dtypes"]})
        if kind == "te":
            rows[-1]["full_24_layer_resident_GB (meta)"] = round(_te_full_resident() / 1e9, 3)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _te_full_resident() -> int:
    """Resident bytes of the whole feature encoder (layers 0-23, MXFP4 experts packed, bf16 rest) computed on a
    model built on ``meta`` with the same parameter shapes and dtypes the GGUF loader produces."""
    from lens_core.checkpoints import REAL_TE_CONFIG, init_empty_weights
    from lens_core.memory import module_bytes
    from lens_core.text_encoder import LensTextEncoder, TextEncoderConfig

    with init_empty_weights():
        m = LensTextEncoder(TextEncoderConfig.from_dict(REAL_TE_CONFIG), dtype=torch.bfloat16)
    return module_bytes(m)


def _quantized_bytes(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Valid blocks of ``w``'s shape: random codes with small finite f16 scales (timing does not depend on the
    values)."""
    out_f, in_f = w.shape
    _, block, size = ggml.TYPES[qtype]
    raw = torch.randint(0, 256, (out_f * in_f // block, size), dtype=torch.uint8)
    scale = torch.tensor([0.001], dtype=torch.float16).view(torch.uint8)
    if qtype in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        raw[:, 0:2] = scale
    if qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        raw[:, 2:4] = scale
    if qtype in ("Q6_K", "Q3_K"):
        raw[:, -2:] = scale
    if qtype == "Q2_K":
        raw[:, -4:-2] = scale
        raw[:, -2:] = scale
    return raw.view(out_f, -1)


def run_layer(args):
    from torch import nn

    from lens_core.quant_linear import GGUFLinear

    rows = []
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    for name, out_f, in_f in (("attn.img_qkv", 4608, 1536), ("img_mlp.w1", 4096, 1536)):
        x = torch.randn(1, args.tokens, in_f, dtype=torch.bfloat16, device=dev)
        ref = nn.Linear(in_f, out_f, dtype=torch.bfloat16, device=dev)
        with torch.no_grad():
            base = median_time(lambda: ref(x), runs=args.runs, sync=sync)
            rows.append({"layer": f"{name} [{out_f}, {in_f}]", "weights": "bf16 nn.Linear",
                         "forward_ms": round(base * 1e3, 1), "dequant_ms": 0.0, "overhead": "1.00x",
                         "weight_MB": round(out_f * in_f * 2 / 1e6, 2)})
            print(json.dumps(rows[-1]), flush=True)
            for qtype in args.types.split(","):
                lin = GGUFLinear(in_f, out_f, qtype, bias=True, dtype=torch.bfloat16, device=dev)
                lin.weight.copy_(_quantized_bytes(ref.weight, qtype))
                lin.bias.copy_(ref.bias)
                t = median_time(lambda: lin(x), runs=args.runs, sync=sync)
                d = median_time(lambda: lin.dequantized_weight(torch.bfloat16), runs=args.runs, sync=sync)
                rows.append({"layer": f"{name} [{out_f}, {in_f}]", "weights": f"GGUF {qtype}",
                             "forward_ms": round(t * 1e3, 1), "dequant_ms": round(d * 1e3, 1),
                             "overhead": f"{t / base:.2f}x", "weight_MB": round(lin.weight.numel() / 1e6, 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def run(args):
    return run_layer(args) if args.mode == "layer" else run_memory(args)
