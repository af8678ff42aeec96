"""Benchmark of the Lens DiT forward at the real width (1536 wide, 24 heads, MLP 4096) with a few blocks.

FLOPs counted per forward (issue 3): per block and per token 2·(3d² + d² + 3·d·4096) for the linears (fused
QKV, output projection, GateMLP) plus 4·N·d for attention (N = image + text tokens), times N tokens and the
block count. The rate is compared with the machine's 2048³ matmul rate in the same dtype.
"""
from __future__ import annotations

import dataclasses

from ..bench import matmul_rate, median_time


def add_arguments(parser):
    parser.add_argument("--sizes", default="512,1024", help="square pixel sizes, comma separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma separated torch dtypes")
    parser.add_argument("--blocks", type=int, default=4, help="number of transformer blocks")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens")
    parser.add_argument("--mode", default="exact,fast", help="DiT numerics: exact and/or fast")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch default); the matmul rate uses the same setting")


def forward_flops(n_img: int, n_txt: int, blocks: int, d: int = 1536, mlp: int = 4096) -> float:
    n = n_img + n_txt
    per_token = 2 * (3 * d * d + d * d + 3 * d * mlp) + 4 * n * d
    return float(blocks) * n * per_token


def run(args):
    import torch

    from ..config import REAL_DIT_CONFIG
    from ..dit import LensTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(REAL_DIT_CONFIG, num_layers=args.blocks)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        rate = matmul_rate(dtype_name, device=args.device, runs=args.runs)
        torch.manual_seed(0)
        model = LensTransformer(cfg, device=args.device, dtype=dtype).eval()
        for size in (int(s) for s in args.sizes.split(",")):
            gh = gw = size // 16
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, gh * gw, 128, generator=gen).to(args.device, dtype)
            feats = torch.randn(1, args.text_len, 4 * cfg.enc_hidden_dim, generator=gen).to(args.device, dtype)
            mask = torch.ones(1, args.text_len, dtype=torch.bool, device=args.device)
            t = torch.full((1,), 0.5, device=args.device)
            flops = forward_flops(gh * gw, args.text_len, args.blocks, cfg.width, cfg.mlp_hidden)
            for mode in args.mode.split(","):
                exact = mode == "exact"
                sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
                with torch.inference_mode():
                    sec = median_time(lambda: model(x, feats, mask, t, grid=(gh, gw), exact=exact),
                                      runs=args.runs, warmup=1, sync=sync)
                achieved = flops / sec / 1e9
                rows.append({"dtype": dtype_name, "threads": torch.get_num_threads(), "size": f"{size}x{size}", "mode": mode,
                             "blocks": args.blocks, "tokens": gh * gw + args.text_len,
                             "s/forward": sec, "GFLOP": flops / 1e9, "GFLOP/s": achieved,
                             "matmul GFLOP/s": rate, "% of matmul": 100 * achieved / rate})
        del model
    return rows
