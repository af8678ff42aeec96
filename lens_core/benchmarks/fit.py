"""Benchmark of the memory plan (issue 25): a full ``generate`` with real-size random weights, peak RSS vs plan.

Writes (once; reused while the files exist) random weights in the real layouts to ``--dir``:

* ``lens_turbo_bf16.safetensors``: the Comfy-Org single-file DiT (1264 tensors, 4,104,225,152 parameters,
  8.21 GB bf16; the name makes it Lens-Turbo: 4 steps, CFG 1 by default);
* ``text_encoder/``: the diffusers GPT-OSS-20B encoder (config.json, 3 shards + index; MXFP4 expert blocks
  and E8M0 scales, the rest bf16; 12.1 GB without ``lm_head``, which the feature encoder never reads);
* ``vae/``: the diffusers FLUX.2 VAE (fp32, 0.34 GB, config.json);

then in a fresh process per run: ``python -m lens_core generate ... --dry-run`` (the plan, nothing read) and the
same command without ``--dry-run``, recording that process's peak RSS (``ru_maxrss`` of the child) against the
plan's peak estimate. ``--tokenizer`` names the o200k_harmony tokenizer.json (tests/tokenizer_build.py rebuilds it
offline). Needs ≈ 21 GB free disk; the run itself needs what the plan says (≈ 13 GB with the default plan on a
24 GB machine). Files are deleted at the end unless ``--keep``. Not part of CI.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch

from lens_core.benchmarks.load import real_shapes, write_entries, write_streaming

DIT_FILE = "lens_turbo_bf16.safetensors"


def add_arguments(parser):
    parser.add_argument("--dir", default="/tmp/lens_fit", help="where the random real-size files are written")
    parser.add_argument("--tokenizer", help="the o200k_harmony tokenizer.json (required)")
    parser.add_argument("--size", type=int, default=512, help="image height = width")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="generate --dtype (auto, bf16, fp32)")
    parser.add_argument("--memory", default=None, help="generate --memory (default: the plan's own choice)")
    parser.add_argument("--write-only", action="store_true", help="write the files and stop")
    parser.add_argument("--keep", action="store_true", help="keep the written files")


# --------------------------------------------------------------------------------------------------
# writing the real-size files (one tensor in memory at a time)
# --------------------------------------------------------------------------------------------------
def te_entries(seed: int = 0) -> list:
    """(name, shape, dtype, make) of the diffusers GPT-OSS-20B feature encoder (no lm_head), in file order."""
    from lens_core.checkpoints import REAL_TE_CONFIG as c

    gen = torch.Generator().manual_seed(seed)
    h, heads, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    e, inter, vocab = c["num_local_experts"], c["intermediate_size"], c["vocab_size"]

    def normal(shape, std=0.02):
        return lambda: torch.empty(shape).normal_(0.0, std, generator=gen).to(torch.bfloat16)

    def ones(shape):
        return lambda: torch.ones(shape, dtype=torch.bfloat16)

    def codes(shape):
        return lambda: torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

    def scales(shape):                       # E8M0 exponents 2^-8 … 2^-5: plausible expert weights
        return lambda: torch.randint(119, 123, shape, dtype=torch.uint8, generator=gen)

    out = [("model.embed_tokens.weight", (vocab, h), "BF16", normal((vocab, h)))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "BF16", ones((h,))),
                (p + "post_attention_layernorm.weight", (h,), "BF16", ones((h,))),
                (p + "self_attn.sinks", (heads,), "BF16", normal((heads,), 1.0))]
        for name, rows, cols in (("q_proj", heads * hd, h), ("k_proj", kv * hd, h), ("v_proj", kv * hd, h),
                                 ("o_proj", h, heads * hd)):
            out += [(f"{p}self_attn.{name}.weight", (rows, cols), "BF16", normal((rows, cols))),
                    (f"{p}self_attn.{name}.bias", (rows,), "BF16", normal((rows,)))]
        out += [(p + "mlp.router.weight", (e, h), "BF16", normal((e, h))),
                (p + "mlp.router.bias", (e,), "BF16", normal((e,)))]
        for name, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            out += [(f"{p}mlp.experts.{name}_blocks", (e, rows, cols // 32, 16), "U8", codes((e, rows, cols // 32, 16))),
                    (f"{p}mlp.experts.{name}_scales", (e, rows, cols // 32), "U8", scales((e, rows, cols // 32))),
                    (f"{p}mlp.experts.{name}_bias", (e, rows), "BF16", normal((e, rows)))]
    out.append(("model.norm.weight", (h,), "BF16", ones((h,))))
    return out


def te_config() -> dict:
    from lens_core.checkpoints import REAL_TE_CONFIG

    return dict(REAL_TE_CONFIG, architectures=["GptOssForCausalLM"], dtype="bfloat16", hidden_act="silu",
                attention_dropout=0.0, quantization_config={
                    "quant_method": "mxfp4", "modules_to_not_convert": [
                        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


def write_text_encoder(folder: str, shards: int = 3) -> list:
    os.makedirs(folder, exist_ok=True)
    entries = te_entries()
    per = -(-len(entries) // shards)
    files, weight_map, total = [], {}, 0
    for i in range(shards):
        part = entries[i * per:(i + 1) * per]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        total += write_entries(os.path.join(folder, name), part)
        weight_map.update({n: name for n, *_ in part})
        files.append(os.path.join(folder, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(te_config(), f, indent=1)
    return files


def write_vae(folder: str) -> str:
    from safetensors.torch import save_file

    from lens_core.benchmarks.vae import random_state_dict
    from lens_core.vae import REAL_VAE_CONFIG

    os.makedirs(folder, exist_ok=True)
    sd = {k: v.contiguous() for k, v in random_state_dict(REAL_VAE_CONFIG).items()}
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_file(sd, path, metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(REAL_VAE_CONFIG.to_dict(), _class_name="AutoencoderKLFlux2"), f, indent=1)
    return path


def write_all(folder: str) -> dict:
    """The three real-size checkpoints in ``folder`` (each written only if its completion marker is absent)."""
    os.makedirs(folder, exist_ok=True)
    paths = {"transformer": os.path.join(folder, DIT_FILE), "text_encoder": os.path.join(folder, "text_encoder"),
             "vae": os.path.join(folder, "vae")}
    for name, writer in (("vae", lambda: write_vae(paths["vae"])),
                         ("text_encoder", lambda: write_text_encoder(paths["text_encoder"])),
                         ("transformer", lambda: write_streaming(
                             paths["transformer"], sorted(real_shapes()), real_shapes(), torch.bfloat16,
                             torch.Generator().manual_seed(0)))):
        done = os.path.join(folder, f".{name}.done")
        if not os.path.exists(done):
            t0 = time.perf_counter()
            writer()
            with open(done, "w") as f:
                f.write(f"{time.perf_counter() - t0:.1f}\n")
            print(f"wrote {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return paths


# --------------------------------------------------------------------------------------------------
# the measurement
# --------------------------------------------------------------------------------------------------
def _generate_argv(paths, tokenizer, args, out) -> list:
    argv = [sys.executable, "-m", "lens_core", "generate", "--model", paths["transformer"], "--text-encoder",
            paths["text_encoder"], "--vae", paths["vae"], "--tokenizer", tokenizer, "--prompt",
            "a red cube on a wooden table", "--height", str(args.size), "--width", str(args.size), "--steps",
            str(args.steps), "--seed", "0", "--dtype", args.dtype, "--out", out]
    if args.memory:
        argv += ["--memory", args.memory]
    return argv


def _repo_env() -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(args):
    if not args.tokenizer or not os.path.isfile(args.tokenizer):
        raise SystemExit("--tokenizer: the o200k_harmony tokenizer.json is required (tests/tokenizer_build.py)")
    rows = []
    try:
        t0 = time.perf_counter()
        paths = write_all(args.dir)
        write_s = time.perf_counter() - t0
        if args.write_only:
            return [{"dir": args.dir, "write_s": write_s}]
        out = os.path.join(args.dir, "out.png")
        if os.path.exists(out):
            os.remove(out)
        argv = _generate_argv(paths, args.tokenizer, args, out)
        dry = subprocess.run(argv + ["--dry-run", "--plan-json"], env=_repo_env(), capture_output=True, text=True)
        if dry.returncode != 0:
            raise RuntimeError(f"dry run failed: {dry.stderr[-3000:]}")
        plan = json.loads(dry.stdout.strip().splitlines()[-1])
        print(dry.stderr, file=sys.stderr, flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=_repo_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(proc.stderr[-4000:], file=sys.stderr, flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"generate failed ({proc.returncode}): {proc.stderr[-3000:]}")
        if before * 1024 >= peak:
            raise RuntimeError("the generate child's peak RSS could not be told apart from the dry run's")
        est = plan["peak_bytes"]
        rows.append({"size": f"{args.size}²", "steps": args.steps, "dtype": plan["compute_dtype"],
                     "plan": plan["mode"], "estimate_GB": est / 1e9, "peak_rss_GB": peak / 1e9,
                     "peak/estimate": peak / est, "available_GB": plan["available_bytes"] / 1e9,
                     "generate_s": wall, "png": os.path.isfile(out)})
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return rows
