"""Benchmark of text generation (the prompt enhancer): prefill and decode tokens/s, ours vs transformers.

A random GPT-OSS is written in the real on-disk MXFP4 layout with an untied ``lm_head``
(``lens_core.benchmarks.te.write_checkpoint``). Each side runs in a fresh forked process: load, then greedy
generation of ``--new`` tokens after a ``--tokens``-long random prompt, ``--runs`` times (medians), each token
time-stamped as it is picked (ours: the generation callback; transformers: a logits processor). Prefill rate =
prompt tokens / time to the first token; decode rate = 1 / the mean step time after it (within each run, so
prefill noise does not leak into it). ``--rounds`` repeats all sides in alternation; the rates are then medians
over the rounds and each ratio the median of the per-round ratios.

- ``ours``: ``lens_core.checkpoints.load_text_encoder`` + ``lens_core.enhance.load_generation_weights`` (experts
  packed, dequantized per call) and ``lens_core.enhance.generate``; ``ours-dequantized``: the same with
  ``experts="dequantized"``; ``ours-cache``: packed with the optional decode-time expert cache
  (``LensTextEncoder.set_expert_cache``, ``--expert-cache-gb``);
- ``transformers``: ``GptOssForCausalLM.from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))``
  and ``generate(do_sample=False, min_new_tokens=max_new_tokens)`` (its dynamic KV cache, eager attention).

    python -m lens_core.bench --component enhance --size tiny|mid [--tokens 128 --new 64 --threads 1 --rounds 3]
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
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat all sides this many times, alternating (ratios: median of the per-round ones)")
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

        def gen(n, stamps):
            return enhance.generate(model, ids, n, eos_token_ids=(),
                                    callback=lambda *_: stamps.append(time.perf_counter()))
    else:
        from transformers import GptOssForCausalLM, LogitsProcessorList, Mxfp4Config

        model = GptOssForCausalLM.from_pretrained(folder, dtype=dtype,
                                                  quantization_config=Mxfp4Config(dequantize=True)).eval()
        vocab = model.config.vocab_size

        def gen(n, stamps):
            def stamp(input_ids, scores):   # called once per generated token, after its forward
                stamps.append(time.perf_counter())
                return scores

            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
            return out[:, ids.shape[1]:]
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    gen(2, [])  # warm-up
    first, steps = [], []
    for _ in range(runs):   # each run: the time to the first token (prefill) and the steps after it (decode)
        stamps = []
        t = time.perf_counter()
        out = gen(new, stamps)
        if len(stamps) != new:
            raise RuntimeError(f"{side}: expected {new} per-token time stamps, found {len(stamps)}")
        first.append(stamps[0] - t)
        steps.append((stamps[-1] - stamps[0]) / (new - 1))
    return {"load_s": load_s, "t1": statistics.median(first), "step": statistics.median(steps),
            "ids": out[0].tolist()}


def run(args):
    from lens_core.bench import print_load, run_isolated
    from lens_core.benchmarks.te import prepare_folder

    size = SIZES[args.size]
    folder, tmp = prepare_folder(SimpleNamespace(workdir=args.workdir, **size), "lens_enhance_bench_")
    print_load("start")
    nbytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
    print(f"# random GPT-OSS ({args.size}): {size}; checkpoint {nbytes / 1e9:.3f} GB; prompt {args.tokens} tokens, "
          f"{args.new} new tokens, greedy; {args.dtype}; threads {args.threads or 'default'}")
    sides = args.sides.split(",")
    rounds = {side: [] for side in sides}
    for _ in range(max(1, args.rounds)):    # sides alternate, so a slower moment of the machine hits them all
        for side in sides:
            res, peak = run_isolated(_child, side, folder, args.tokens, args.new, args.dtype, args.runs, args.threads,
                                     args.expert_cache_gb)
            res["peak"] = peak
            rounds[side].append(res)
    med = statistics.median
    ref = rounds.get("transformers")
    rows = []
    for side, rs in rounds.items():
        row = {"side": side, "prefill_tok_s": args.tokens / med(r["t1"] for r in rs),
               "decode_tok_s": 1.0 / max(med(r["step"] for r in rs), 1e-9),
               "load_s": med(r["load_s"] for r in rs), "peak_rss_GB": max(r["peak"] for r in rs) / 1e9}
        if ref is not None and side != "transformers":
            # per round (the sides of one round ran back to back), then the median over the rounds
            row["prefill_ratio"] = med(t["t1"] / r["t1"] for r, t in zip(rs, ref))
            row["decode_ratio"] = med(t["step"] / r["step"] for r, t in zip(rs, ref))
            row["same_ids_as_tf"] = all(r["ids"] == t["ids"] for r, t in zip(rs, ref))
        rows.append(row)
    print_load("end")
    if tmp is not None:
        tmp.cleanup()
    return rows
