"""LoRA benchmark on the real-width Lens DiT (random weights): time to read + apply a rank-64 adapter on every
attention + MLP Linear (10 per block), and the per-step cost of the adapter merged (plain weights) vs applied per
call (fp8-stored block Linears).

Only ``--blocks`` of the 48 blocks are built (memory on a shared machine); every figure that scales with the
block count is also given extrapolated to 48 blocks (×48/blocks: apply time and forward time are per block sums).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from ..bench import median_time

TARGETS = ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out", "img_mlp.w1", "img_mlp.w2",
           "img_mlp.w3", "txt_mlp.w1", "txt_mlp.w2", "txt_mlp.w3")


def add_arguments(parser):
    parser.add_argument("--blocks", type=int, default=4, help="transformer blocks built (extrapolated to 48)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="storage dtype of the merged weights")
    parser.add_argument("--step-dtype", default="float32", help="compute dtype of the per-step forward timing")
    parser.add_argument("--size", type=int, default=512, help="square image size of the per-step forward")
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)


def _write_adapter(path, model, rank):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for b in range(len(model.transformer_blocks)):
        for t in TARGETS:
            name = f"transformer_blocks.{b}.{t}"
            out_f, in_f = model.get_submodule(name).weight.shape
            flat = "lora_unet_" + name.replace(".", "_")
            sd[flat + ".lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(torch.bfloat16)
            sd[flat + ".lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(torch.bfloat16)
            sd[flat + ".alpha"] = torch.tensor(float(rank) / 2)
    save_file(sd, path)
    return sum(t.numel() * t.element_size() for t in sd.values())


def _to_fp8(model):
    """The same model with every fp8-eligible block Linear stored as FP8Linear (what ``fp8=True`` loads)."""
    import torch

    from .. import quant_linear as ql
    from ..checkpoints.assign import _replace_module

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ql.fp8_eligible(name):
            new = ql.FP8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=mod.weight.dtype)
            data, scale = ql.quantize_fp8_rowwise(mod.weight.detach())
            new.weight.data, new.weight_scale.data = data, scale
            if mod.bias is not None:
                new.bias.data = mod.bias.detach().clone()
            _replace_module(model, name, new)
    return model


def run(args):
    import torch

    from .. import lora as lo
    from ..config import REAL_DIT_CONFIG
    from ..dit import LensTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    scale48 = 48 / args.blocks
    cfg = dataclasses.replace(REAL_DIT_CONFIG, num_layers=args.blocks)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = LensTransformer(cfg, dtype=dtype).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank64.safetensors")
        nbytes = _write_adapter(path, model, args.rank)
        t0 = time.perf_counter()
        adapter = lo.load_lora(path)
        t_load = time.perf_counter() - t0
    t_apply = median_time(lambda: (lo.apply_lora(model, adapter, 0.8), lo.remove_loras(model)), runs=args.runs,
                          warmup=1)
    t0 = time.perf_counter()
    lo.apply_lora(model, adapter, 0.8)
    t_first = time.perf_counter() - t0      # includes the one-time CPU backup of every patched weight
    t0 = time.perf_counter()
    lo.remove_loras(model)
    t_remove = time.perf_counter() - t0
    common = {"blocks": args.blocks, "targets": len(adapter.targets), "rank": args.rank, "dtype": args.dtype}
    rows.append(dict(common, what="read file (bf16 factors)", MB=nbytes / 2**20, s=t_load, s_48_blocks=t_load * scale48))
    rows.append(dict(common, what="apply (merge, first: backup + merge)", s=t_first, s_48_blocks=t_first * scale48))
    rows.append(dict(common, what="apply + remove (median)", s=t_apply, s_48_blocks=t_apply * scale48))
    rows.append(dict(common, what="remove (restore exact weights)", s=t_remove, s_48_blocks=t_remove * scale48))

    # per-step overhead
    sdt = getattr(torch, args.step_dtype)
    model = model.to(sdt)
    gh = gw = args.size // 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, gh * gw, 128, generator=gen).to(sdt)
    feats = torch.randn(1, args.text_len, 4 * cfg.enc_hidden_dim, generator=gen).to(sdt)
    mask = torch.ones(1, args.text_len, dtype=torch.bool)
    t = torch.full((1,), 0.5)

    def fwd(m):
        with torch.inference_mode():
            return m(x, feats, mask, t, grid=(gh, gw), exact=False)

    step = dict(blocks=args.blocks, dtype=args.step_dtype, size=f"{args.size}x{args.size}",
                tokens=gh * gw + args.text_len)
    base = median_time(lambda: fwd(model), runs=args.runs, warmup=1)
    lo.apply_lora(model, adapter, 0.8)
    merged = median_time(lambda: fwd(model), runs=args.runs, warmup=1)
    lo.remove_loras(model)
    rows.append(dict(step, what="forward, plain weights", s=base, s_48_blocks=base * scale48))
    rows.append(dict(step, what="forward, LoRA merged", s=merged, s_48_blocks=merged * scale48,
                     overhead_pct=100 * (merged / base - 1)))
    # per-token multiply-adds of the per-call LoRA path vs the per-token block Linears (the modulation Linears run
    # once per block on the time embedding; attention scores excluded)
    lin = sum(m.in_features * m.out_features for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.") and "_mod" not in n)
    extra = sum(args.rank * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
                for n in adapter.targets)
    q = _to_fp8(model)
    qbase = median_time(lambda: fwd(q), runs=args.runs, warmup=1)
    lo.apply_lora(q, adapter, 0.8)
    qlora = median_time(lambda: fwd(q), runs=args.runs, warmup=1)
    rows.append(dict(step, what="forward, fp8 layers", s=qbase, s_48_blocks=qbase * scale48))
    rows.append(dict(step, what="forward, fp8 layers + LoRA per call", s=qlora, s_48_blocks=qlora * scale48,
                     overhead_pct=100 * (qlora / qbase - 1), linear_flops_added_pct=100 * extra / lin))
    return rows
