"""Benchmarks of the Lens DiT at the real width (1536 wide, 24 heads, MLP 4096).

Three modes (all take ``--device`` cpu|cuda; the device name is printed):

- default: the forward's rate with a few blocks, compared with the machine's matmul rate in the same dtype.
  FLOPs per forward (issue 3): per block and per token 2·(3d² + d² + 3·d·4096) for the linears (fused QKV,
  output projection, GateMLP) plus 4·N·d for attention (N = image + text tokens), times N and the blocks.
- ``--official FILE``: ours against the official ``LensTransformer2DModel`` (a rebuild of the official
  ``transformer.py`` kept outside this repository; FILE is that Python file) with the same random weights and
  inputs, in one process, runs interleaved (official, ours exact, ours fast, …), medians. Rows: one forward
  (batch 1), one Lens step (CFG 5: the official batch of 2 [pos; neg] + CFG rescale + Euler vs
  ``sampling.sample(steps=1)``) and one Turbo step (CFG 1: the official still runs the batch of 2; our fast
  path runs one forward; the official step is the same computation at both g, so it is timed once and serves
  both rows). The positive prompt is unpadded, the negative is the empty one (zeros, all-False
  mask), as in the official pipeline's default.
- ``--full``: all blocks (48 unless ``--blocks``) end to end through ``sampling.sample``: Lens (20 steps,
  CFG 5) and Turbo (4 steps, CFG 1) at ``--sizes`` (default 1024), with the time per run, the ratio to the
  FLOP floor (forwards × 16.6 TFLOP at 1024², scaled by the token count at other sizes, over the measured
  matmul rate of the device) and to the paper's H100 figures (3.15 s Lens, 0.84 s Turbo at 1024²).
  ``--tiny`` swaps in a CI-size config (2 blocks, 2 heads × 16) in any mode, so each can be smoke-tested on
  a CPU (tests/test_bench.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import statistics
import time

from ..bench import matmul_rate, median_time

PAPER_H100_S = {"lens": 3.15, "turbo": 0.84}  # paper, 1024², H100 (issue 18)
FORWARD_TFLOP_1024 = 16.6  # one forward at 1024² (issue 18)
FULL_RUNS = {"lens": (20, 5.0), "turbo": (4, 1.0)}


def add_arguments(parser):
    parser.add_argument("--sizes", default=None, help="square pixel sizes, comma separated "
                        "(default 512,1024; --full: 1024)")
    parser.add_argument("--dtypes", default=None, help="comma separated torch dtypes "
                        "(default float32,bfloat16; --official: float32; --full: bfloat16 on cuda, else float32)")
    parser.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 4; --full: 48)")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens")
    parser.add_argument("--mode", default="exact,fast", help="DiT numerics: exact and/or fast")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch default); the matmul rate uses the same setting")
    parser.add_argument("--official", default=None, metavar="FILE",
                        help="the official transformer.py rebuild (outside the repo) to compare against")
    parser.add_argument("--rows", default="forward,lens,turbo", help="--official: which rows to time")
    parser.add_argument("--variants", default="exact,fast", help="--official: our variants to time")
    parser.add_argument("--full", action="store_true", help="all blocks end to end: Lens and Turbo runs")
    parser.add_argument("--tiny", action="store_true", help="a CI-size config (2 heads × 16) for smoke tests")
    parser.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")


def forward_flops(n_img: int, n_txt: int, blocks: int, d: int = 1536, mlp: int = 4096) -> float:
    n = n_img + n_txt
    per_token = 2 * (3 * d * d + d * d + 3 * d * mlp) + 4 * n * d
    return float(blocks) * n * per_token


def _config(args, default_blocks):
    """The real DiT config with ``--blocks`` blocks, or with ``--tiny`` a CI-size one (2 heads × 16)."""
    from ..config import REAL_DIT_CONFIG, LensDiTConfig

    if args.tiny:
        return LensDiTConfig(num_layers=args.blocks or 2, attention_head_dim=16, num_attention_heads=2,
                             inner_dim=32, enc_hidden_dim=32, axes_dims_rope=(4, 6, 6))
    return dataclasses.replace(REAL_DIT_CONFIG, num_layers=args.blocks or default_blocks)


def _load_avg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _sync(device):
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else None


def _inputs(cfg, size, text_len, device, dtype, batch=1):
    import torch

    gh = gw = size // 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, gh * gw, cfg.in_channels, generator=gen).to(device, dtype)
    feats = [torch.randn(batch, text_len, cfg.enc_hidden_dim, generator=gen).to(device, dtype)
             for _ in range(cfg.num_text_layers)]
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    return (gh, gw), x, feats, mask


def _rate_rows(args, device):
    import torch

    from ..dit import LensTransformer

    cfg = _config(args, 4)
    rows = []
    for dtype_name in (args.dtypes or "float32,bfloat16").split(","):
        dtype = getattr(torch, dtype_name)
        rate = matmul_rate(dtype_name, device=device, runs=args.runs)
        torch.manual_seed(0)
        model = LensTransformer(cfg, device=device, dtype=dtype).eval()
        for size in (int(s) for s in (args.sizes or ("64" if args.tiny else "512,1024")).split(",")):
            grid, x, feats, mask = _inputs(cfg, size, args.text_len, device, dtype)
            t = torch.full((1,), 0.5, device=device)
            flops = forward_flops(grid[0] * grid[1], args.text_len, cfg.num_layers, cfg.width, cfg.mlp_hidden)
            for mode in args.mode.split(","):
                exact = mode == "exact"
                with torch.inference_mode():
                    sec = median_time(lambda: model(x, feats, mask, t, grid=grid, exact=exact),
                                      runs=args.runs, warmup=1, sync=_sync(device))
                achieved = flops / sec / 1e9
                rows.append({"dtype": dtype_name, "threads": torch.get_num_threads(), "size": f"{size}x{size}",
                             "mode": mode, "blocks": cfg.num_layers, "tokens": grid[0] * grid[1] + args.text_len,
                             "s/forward": sec, "GFLOP": flops / 1e9, "GFLOP/s": achieved,
                             "matmul GFLOP/s": rate, "% of matmul": 100 * achieved / rate})
        del model
    return rows


# ---------------------------------------------------------------------------------------------------------
# Ours vs the official code


def load_official(path: str):
    """The official ``LensTransformer2DModel`` class from a Python file outside this repository."""
    if not os.path.isfile(path):
        raise OSError(f"--official {path!r}: expected the official transformer.py rebuild (a .py file defining "
                      f"LensTransformer2DModel), found no such file")
    spec = importlib.util.spec_from_file_location("lens_official_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, "LensTransformer2DModel", None)
    if cls is None:
        raise ValueError(f"--official {path!r}: expected a class LensTransformer2DModel in that file, found none")
    return cls


def _official_step(official, latents, feats, mask, neg_feats, neg_mask, t, sigma, sigma_next, grid, guidance):
    """One step of the official pipeline loop: the DiT on the batch of 2 [pos; neg] (img_shapes as a list of
    (frames, H', W')), chunk, CFG with the per-token norm rescale, Euler (spec §4)."""
    import torch

    from ..sampling import cfg_combine, euler_step

    stacked = [torch.cat([p, n]) for p, n in zip(feats, neg_feats)]
    v = official(torch.cat([latents, latents]), stacked, torch.cat([mask, neg_mask]), t.expand(2),
                 [(1, grid[0], grid[1])])
    cond, uncond = v.chunk(2)
    return euler_step(latents, cfg_combine(cond, uncond, guidance), sigma, sigma_next)


def _compare_rows(args, device):
    import torch

    from ..dit import LensTransformer
    from ..sampling import model_timesteps, sample, sigma_schedule

    official_cls = load_official(args.official)
    cfg = _config(args, 4)
    rows = []
    for dtype_name in (args.dtypes or "float32").split(","):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        ours = LensTransformer(cfg, device=device, dtype=dtype).eval()
        accepted = inspect.signature(official_cls).parameters
        official = official_cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in accepted})
        official = official.to(device=device, dtype=dtype).eval()
        official.load_state_dict(ours.state_dict())
        variants = ["official"] + args.variants.split(",") + (["fast+compile"] if args.compile else [])
        compiled = ours.enable_compile()._compiled_block if args.compile else None
        ours.enable_compile(False)
        for size in (int(s) for s in (args.sizes or ("64" if args.tiny else "1024")).split(",")):
            grid, x, feats, mask = _inputs(cfg, size, args.text_len, device, dtype)
            neg = [torch.zeros_like(f) for f in feats]
            neg_mask = torch.zeros_like(mask)
            sig = sigma_schedule(1, grid[0] * grid[1]).to(device)
            t = model_timesteps(sig, dtype)[0].reshape(1)

            def forward(variant):
                if variant == "official":
                    return official(x, feats, mask, t, [(1, grid[0], grid[1])])
                ours._compiled_block = compiled if variant == "fast+compile" else None
                return ours(x, feats, mask, t, grid=grid, exact=variant == "exact")

            def step(variant, guidance):
                if variant == "official":
                    return _official_step(official, x, feats, mask, neg, neg_mask, t, sig[0], sig[1], grid,
                                          guidance)
                ours._compiled_block = compiled if variant == "fast+compile" else None
                return sample(ours, x, feats, mask, grid=grid, steps=1, cfg=guidance,
                              exact=variant == "exact", dtype=dtype)

            # The official step is the same batch of 2 at CFG 5 and at CFG 1 (only g differs), so one timed
            # official step serves both rows; everything of one size is interleaved run by run.
            calls = {}
            for what in args.rows.split(","):
                for v in variants:
                    if what == "forward":
                        calls[(what, v)] = (lambda v=v: forward(v))
                    elif v == "official" and ("lens", "official") in calls:
                        continue
                    else:
                        g = 5.0 if what == "lens" else 1.0
                        calls[(what, v)] = (lambda v=v, g=g: step(v, g))
            times = {k: [] for k in calls}
            cpu = {k: [] for k in calls}  # process CPU time: less sensitive to other jobs on a shared machine
            outs = {}
            with torch.inference_mode():
                for k, fn in calls.items():  # warm-up (and compilation) + outputs for the agreement check
                    outs[k] = fn().float().cpu()
                if "turbo" in args.rows.split(",") and ("turbo", "official") not in calls:
                    outs[("turbo", "official")] = step("official", 1.0).float().cpu()
                for _ in range(args.runs):
                    for k, fn in calls.items():
                        sync = _sync(device)
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        if sync:
                            sync()
                        times[k].append(time.perf_counter() - t0)
                        cpu[k].append(time.process_time() - c0)
            for what in args.rows.split(","):
                off_key = (what, "official") if (what, "official") in times else ("lens", "official")
                ref = statistics.median(times[off_key])
                row = {"what": what, "dtype": dtype_name, "threads": torch.get_num_threads(),
                       "size": f"{size}x{size}", "blocks": cfg.num_layers, "official s": ref}
                ref_cpu = statistics.median(cpu[off_key])
                row["official cpu s"] = ref_cpu
                for v in variants[1:]:
                    row[f"{v} ×"] = statistics.median(times[(what, v)]) / ref
                    row[f"{v} cpu ×"] = statistics.median(cpu[(what, v)]) / ref_cpu
                    row[f"{v} maxdiff"] = float((outs[(what, v)] - outs[(what, "official")]).abs().max())
                row["all times"] = " ".join(f"{v}:" + "/".join(f"{s:.3g}" for s in times[(what, v)])
                                            for v in variants if (what, v) in times)
                rows.append(row)
            print(f"# size {size} done, load average {_load_avg()}", flush=True)
        del ours, official, compiled
    return rows


# ---------------------------------------------------------------------------------------------------------
# Full model end to end


def _full_rows(args, device):
    import torch

    from ..dit import LensTransformer
    from ..sampling import make_noise, sample

    cfg = _config(args, 48)
    sizes = args.sizes or ("64" if args.tiny else "1024")
    dtype_name = (args.dtypes or ("bfloat16" if device.startswith("cuda") else "float32")).split(",")[0]
    dtype = getattr(torch, dtype_name)
    rate = matmul_rate(dtype_name, n=8192 if device.startswith("cuda") else 2048, device=device, runs=args.runs)
    torch.manual_seed(0)
    model = LensTransformer(cfg, device=device, dtype=dtype).eval()
    for p in model.parameters():  # keep activations O(1) through 48 blocks (default init is fine for speed)
        if p.ndim == 2:
            p.data.mul_(0.5)
    if args.compile:
        model.enable_compile()
    rows = []
    for size in (int(s) for s in sizes.split(",")):
        gh = gw = size // 16
        noise = make_noise(0, 1, gh, gw, cfg.in_channels)
        gen = torch.Generator().manual_seed(1)
        feats = [torch.randn(1, args.text_len, cfg.enc_hidden_dim, generator=gen) for _ in range(cfg.num_text_layers)]
        mask = torch.ones(1, args.text_len, dtype=torch.bool)
        tokens = gh * gw + args.text_len
        # the 16.6 TFLOP per forward at 1024² (4096 image tokens + text), scaled by our own count
        per_forward = FORWARD_TFLOP_1024 * 1e12 * (
            forward_flops(gh * gw, args.text_len, cfg.num_layers, cfg.width, cfg.mlp_hidden)
            / forward_flops(4096, args.text_len, 48))
        for name, (steps, guidance) in FULL_RUNS.items():
            for mode in args.mode.split(","):
                exact = mode == "exact"
                single = not exact and guidance == 1.0
                forwards = steps * (1 if single else 2)
                with torch.inference_mode():
                    sec = median_time(lambda: sample(model, noise, feats, mask, grid=(gh, gw), steps=steps,
                                                     cfg=guidance, exact=exact, dtype=dtype, device=device),
                                      runs=args.runs, warmup=1, sync=_sync(device))
                floor = forwards * per_forward / (rate * 1e9)
                row = {"run": f"{name} {steps} steps cfg {guidance:g}", "mode": mode, "dtype": dtype_name,
                       "size": f"{size}x{size}", "blocks": cfg.num_layers, "tokens": tokens,
                       "forwards": forwards, "s/run": sec, "TFLOP/s": forwards * per_forward / sec / 1e12,
                       "matmul TFLOP/s": rate / 1e3, "× FLOP floor": sec / floor}
                if size == 1024 and cfg.num_layers == 48 and not args.tiny:
                    row["× paper H100"] = sec / PAPER_H100_S[name]
                rows.append(row)
    return rows


def run(args):
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, str(args.device))
    finally:
        torch.set_num_threads(threads)


def _run(args, device):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available in this torch ({torch.__version__}); "
                         f"use --device cpu or a CUDA build")
    print(f"# load average at start: {_load_avg()}", flush=True)
    if args.full:
        rows = _full_rows(args, device)
    elif args.official:
        rows = _compare_rows(args, device)
    else:
        rows = _rate_rows(args, device)
    print(f"# load average at end: {_load_avg()}")
    return rows
