"""Benchmark of text generation (the prompt enhancer): prefill and decode tokens/s, ours vs transformers.

A random GPT-OSS is written in the real on-disk MXFP4 layout with an untied ``lm_head``
(``lens_core.benchmarks.te.write_checkpoint``). Each side runs in a fresh forked process: load, then greedy
generation of 1 and of ``--new`` tokens after a ``--tokens``-long random prompt (``--runs`` times each, medians).
Prefill rate = prompt tokens / time(1 new token); decode rate = (new − 1) / (time(new) − time(1)).

- ``ours``: ``lens_core.checkpoints.load_text_encoder`` + ``lens_core.enhance.load_generation_weights`` (experts
  packed, dequantized per call) and ``lens_core.enhance.generate``; ``ours-dequantized``: the same with
  ``experts="dequantized"``; ``ours-cache``: packed with the optional decode-time expert cache
  (``LensTextEncoder.set_expert_cache``, ``--expert-cache-gb``);
- ``transformers``: ``GptOssForCausalLM.from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))``
  and ``generate(do_sample=False, min_new_tokens=max_new_tokens)`` (its dynamic KV cache, eager attention).

    python -m lens_core.bench --component enhance --size tiny|mid [--tokens 128 --new 64 --threads 1]
"""
from __future__ import annotations

import os
import statistics
import time
from types import SimpleNamespace

SIZES = {  # layers, hidden (= intermediate), experts, top-k, vocab
    "tiny": dict(layers=4, hidden=128, experts=8, top_k=2, vocab=2000),
    "mid": dict(layers=8, hidden=1024, experts=16, top_k=4, vocab=32000),
}


def add_arguments(parser):
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--tokens", type=int, default=128, help="prompt length")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--sides", default="ours,ours-dequantized,ours-cache,transformers")
    parser.add_argument("--expert-cache-gb", type=float, default=0.5,
                        help="budget of the ours-cache side's dequantized-expert cache")
    parser.add_argument("--workdir", default=None)


def _child(side, folder, tokens, new, dtype_name, runs, threads, cache_gb=0.0):
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    ids = None
    t0 = time.perf_counter()
    if side.startswith("ours"):
        from lens_core import enhance
        from lens_core.checkpoints import load_text_encoder

        model = load_text_encoder(folder, dtype=dtype, selected_layers=(0,),
                                  experts="dequantized" if side == "ours-dequantized" else "packed")
        enhance.load_generation_weights(model)
        if side == "ours-cache":
            model.set_expert_cache(int(cache_gb * 1e9))
        vocab = model.config.vocab_size

        def gen(n):
            return enhance.generate(model, ids, n, eos_token_ids=())
    else:
        from transformers import GptOssForCausalLM, Mxfp4Config

        model = GptOssForCausalLM.from_pretrained(folder, dtype=dtype,
                                                  quantization_config=Mxfp4Config(dequantize=True)).eval()
        vocab = model.config.vocab_size

        def gen(n):
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
            return out[:, ids.shape[1]:]
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    gen(2)  # warm-up

    def timed(n):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            out = gen(n)
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    t1, _ = timed(1)
    tn, out = timed(new)
    return {"load_s": load_s, "t1": t1, "tn": tn, "ids": out[0].tolist()}


def run(args):
    from lens_core.bench import print_load, run_isolated
    from lens_core.benchmarks.te import prepare_folder

    size = SIZES[args.size]
    folder, tmp = prepare_folder(SimpleNamespace(workdir=args.workdir, **size), "lens_enhance_bench_")
    print_load("start")
    nbytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
    print(f"# random GPT-OSS ({args.size}): {size}; checkpoint {nbytes / 1e9:.3f} GB; prompt {args.tokens} tokens, "
          f"{args.new} new tokens, greedy; {args.dtype}; threads {args.threads or 'default'}")
    results = {}
    for side in args.sides.split(","):
        res, peak = run_isolated(_child, side, folder, args.tokens, args.new, args.dtype, args.runs, args.threads,
                                 args.expert_cache_gb)
        res["peak"] = peak
        results[side] = res
    ref = results.get("transformers")
    rows = []
    for side, r in results.items():
        prefill = args.tokens / r["t1"]
        decode = (args.new - 1) / max(r["tn"] - r["t1"], 1e-9)
        row = {"side": side, "prefill_tok_s": prefill, "decode_tok_s": decode, "load_s": r["load_s"],
               "peak_rss_GB": r["peak"] / 1e9}
        if ref is not None and side != "transformers":
            row["prefill_ratio"] = prefill / (args.tokens / ref["t1"])
            row["decode_ratio"] = decode / ((args.new - 1) / max(ref["tn"] - ref["t1"], 1e-9))
            row["same_ids_as_tf"] = r["ids"] == ref["ids"]
        rows.append(row)
    print_load("end")
    if tmp is not None:
        tmp.cleanup()
    return rows
