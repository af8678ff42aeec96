"""Benchmark of ``python -m lens_core quantize`` (issue 23 part 5): peak RSS and time on a real-size DiT.

Writes a random real-config Lens DiT (4,104,225,152 parameters, the real 1264 key names and shapes) as the
Comfy-Org single-file layout ``lens_bf16.safetensors`` (8.2 GB, bf16) to ``--dir`` (with the streaming writer of
:mod:`lens_core.benchmarks.load`), then converts it to each ``--formats`` entry, each in a fresh process,
recording: the peak RSS of that process; the RSS of a process that only imported what the converter imports
(torch, lens_core, comfy-kitchen) — the difference is what the conversion itself holds; the largest single
tensor of the source in fp32 (the converter's working copy of one layer); output size; wall time. Files are
deleted at the end unless ``--keep``. Needs ≈ 13 GB free disk, < 1 GB RAM. Not part of CI.
"""
from __future__ import annotations

import os
import resource

import torch


def add_arguments(parser):
    parser.add_argument("--dir", default="/tmp/lens_quantize_bench", help="where the random DiT is written")
    parser.add_argument("--formats", default="int8_convrot,convrot_w4a4")
    parser.add_argument("--keep", action="store_true", help="keep the written files")


def _baseline() -> dict:
    import comfy_kitchen.tensor  # noqa: F401
    import lens_core.checkpoints  # noqa: F401
    import lens_core.convert  # noqa: F401
    import lens_core.dit  # noqa: F401

    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _convert(src: str, out: str, fmt: str) -> dict:
    from lens_core.convert import quantize_file

    s = quantize_file(src, out, fmt, overwrite=True)
    return {"seconds": s["seconds"], "bytes": s["bytes"], "layers": s["quantized_layers"]}


def run(args):
    from lens_core.bench import run_isolated
    from lens_core.benchmarks.load import real_shapes, write_streaming

    os.makedirs(args.dir, exist_ok=True)
    shapes = real_shapes()
    src = os.path.join(args.dir, "lens_bf16.safetensors")
    if not os.path.isfile(src):
        write_streaming(src, sorted(shapes), shapes, torch.bfloat16, torch.Generator().manual_seed(0))
    largest = max(shapes, key=lambda k: torch.Size(shapes[k]).numel())
    layer_mb = torch.Size(shapes[largest]).numel() * 4 / 1e6
    _, base = run_isolated(_baseline)
    rows = []
    try:
        for fmt in args.formats.split(","):
            out = os.path.join(args.dir, f"lens_{fmt}.safetensors")
            res, peak = run_isolated(_convert, src, out, fmt)
            rows.append({"format": fmt, "source GB": round(os.path.getsize(src) / 1e9, 3),
                         "output GB": round(res["bytes"] / 1e9, 3), "layers quantized": res["layers"],
                         "seconds": res["seconds"], "peak RSS MB": round(peak / 1e6),
                         "imports-only RSS MB": round(base / 1e6),
                         "conversion MB (peak - imports)": round((peak - base) / 1e6),
                         f"largest tensor fp32 MB ({largest})": round(layer_mb, 1)})
            if not args.keep:
                os.remove(out)
    finally:
        if not args.keep:
            os.remove(src)
    return rows
