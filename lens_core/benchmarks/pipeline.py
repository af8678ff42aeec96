"""Benchmark of the standalone pipeline: load, text encoding, denoising and decoding times + peak RSS.

``python -m lens_core.bench --component pipeline --model PATH [--height 64 --width 96 --steps 4 --cfg 1
--dtype bf16]``; ``PATH`` is anything ``LensPipeline.from_pretrained`` takes (a diffusers folder). Each row
runs in a fresh process (peak RSS of that process).
"""
from __future__ import annotations

import time

import torch

from lens_core.bench import run_isolated


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a diffusers Lens folder")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16,float32", help="comma-separated run dtypes")


def _one(model, dtype_name, height, width, steps, cfg, device, runs):
    from lens_core.pipeline import LensPipeline

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    pipe = LensPipeline.from_pretrained(model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    prompt = "a red cube on a wooden table"
    pipe(prompt, height=height, width=width, steps=steps, cfg=cfg)  # warm-up
    enc, total = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        pipe.encode(prompt, "", 1, "2026-05-23")
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pipe(prompt, height=height, width=width, steps=steps, cfg=cfg)
        total.append(time.perf_counter() - t0)
    enc.sort()
    total.sort()
    return load_s, enc[len(enc) // 2], total[len(total) // 2]


def run(args):
    rows = []
    for dtype_name in args.dtype.split(","):
        (load_s, enc_s, total_s), peak = run_isolated(_one, args.model, dtype_name, args.height, args.width,
                                                      args.steps, args.cfg, args.device, args.runs)
        rows.append({"dtype": dtype_name, "size": f"{args.height}x{args.width}", "steps": args.steps,
                     "cfg": args.cfg, "load_s": load_s, "encode_s": enc_s, "generate_s": total_s,
                     "peak_rss_GB": peak / 1e9})
    return rows
