"""DiT step speed with ComfyUI's quantized formats (issue 23): ``--component quant``.

One Turbo step (one forward, CFG 1, the fast path: ``sampling.sample(steps=1, cfg=1, exact=False)``) of a DiT with
``--blocks`` real-width blocks (1536 wide, MLP 4096; default 4) at ``--size`` (default 1024²), random weights,
with the block Linears (not img_mod/txt_mod, as ComfyUI's quantized files keep them) stored in each of
``--formats`` (:mod:`lens_core.quant_formats`, quantized with comfy-kitchen's quantizers) against plain fp32 and
bf16 storage. The activation dtype of a row is ``--act`` (fp32 and/or bf16); a quantized model keeps its other
weights in that dtype. Rows are timed interleaved, run by run (baseline, then each variant, repeated), so load
changes on a shared machine hit all of them; wall and process-CPU medians are printed, with the ratio to the
fp32 fast step.

What runs on the CPU per format (ComfyUI's own CPU numerics, lens_core/quant_formats.py): ``int8_tensorwise``
(ConvRot or plain) and ``asym_w4a8_int8`` quantize the activations per row and multiply int8 × int8 with
``torch._int_mm`` (oneDNN; AMX-INT8 / AVX512-VNNI where the CPU has them) through comfy-kitchen's eager
``int8_linear``; ``convrot_w4a4`` emulates its int4 GEMM in the activation dtype; fp8 / MXFP8 / NVFP4 dequantize
the weight per call and multiply in the activation dtype.

Memory: the models are built one format at a time (only the fp32 and bf16 baselines stay), peak ≈ 2.5 GB at 4
blocks.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

DEFAULT_FORMATS = "int8_tensorwise+convrot,int8_tensorwise,float8_e4m3fn,mxfp8,nvfp4,convrot_w4a4,asym_w4a8_int8"


def add_arguments(parser):
    parser.add_argument("--size", type=int, default=1024, help="square pixel size (default 1024)")
    parser.add_argument("--blocks", type=int, default=4, help="transformer blocks at the real width (default 4)")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens")
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help="comma separated formats (int8_tensorwise+convrot = ConvRot g256)")
    parser.add_argument("--act", default="float32,bfloat16", help="activation dtypes of the quantized rows")
    parser.add_argument("--tiny", action="store_true", help="a CI-size config for smoke tests")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")


def _options(spec: str):
    from .. import quant_formats as qf

    name, _, extra = spec.partition("+")
    fmt = qf.get(name)
    opts = dict(fmt.default_options())
    if name == "int8_tensorwise":
        opts = {"convrot": extra == "convrot"}
        if extra == "convrot":
            opts["convrot_groupsize"] = 256
    return name, opts


def _quantized_copy(base, name: str, opts: dict, dtype, tiny: bool):
    """``base`` (fp32) with every block Linear except the modulation stored in ``name`` and the rest in
    ``dtype``; built on meta through the storage plan, then filled (one layer quantized at a time)."""
    import torch

    from .. import quant_formats as qf
    from .. import quant_linear as ql
    from ..checkpoints.assign import init_empty_weights
    from ..dit import LensTransformer
    from ..ops import build_planned

    if tiny and "convrot_groupsize" in opts:
        opts = dict(opts, convrot_groupsize=16)
    chosen = {}
    fmt = qf.get(name)

    def plan(probe):
        for n, m in probe.named_modules():
            if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.") and "_mod." not in n \
                    and fmt.supports(m.out_features, m.in_features, opts):
                chosen[n] = ("QuantLinear", {"fmt": name, "options": opts})
        return chosen

    with init_empty_weights():
        model = build_planned(lambda ops: LensTransformer(base.config, operations=ops, dtype=dtype), None, plan)
    sd = base.state_dict()
    with torch.no_grad():
        for n, m in model.named_modules():
            if n in chosen:
                q = ql.quant_linear_for(m.out_features, m.in_features, name, opts, bias=m.bias is not None,
                                        dtype=dtype, weight=sd[n + ".weight"])
                if q.bias is not None:
                    q.bias.copy_(sd[n + ".bias"].to(dtype))
                parent, _, attr = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, q)
        for k, p in list(model.named_parameters()):
            if p.device.type == "meta":
                mod, _, attr = k.rpartition(".")
                owner = model.get_submodule(mod) if mod else model
                owner._parameters[attr] = torch.nn.Parameter(sd[k].to(dtype), requires_grad=False)
    for n, b in model.named_buffers():
        if b.device.type == "meta":
            raise RuntimeError(f"buffer {n} left on meta")
    return model.eval()


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(args):
    import torch

    from ..benchmarks.dit import _config, _inputs, _load_avg
    from ..dit import LensTransformer
    from ..sampling import sample

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ns = dataclasses.make_dataclass("A", [("tiny", bool), ("blocks", int)])(args.tiny, args.blocks)
        cfg = _config(ns, args.blocks)
        size = 64 if args.tiny else args.size
        print(f"# load average at start: {_load_avg()}", flush=True)
        torch.manual_seed(0)
        base = LensTransformer(cfg, dtype=torch.float32).eval()
        for p in base.parameters():
            if p.ndim == 2:
                p.data.mul_(0.5)
        bf16 = LensTransformer(cfg, dtype=torch.bfloat16).eval()
        bf16.load_state_dict(base.state_dict())
        rows, models = [], {"fp32 storage": (base, torch.float32), "bf16 storage": (bf16, torch.bfloat16)}
        inputs = {dt: _inputs(cfg, size, args.text_len, "cpu", dt) for dt in (torch.float32, torch.bfloat16)}

        def step(model, dt):
            grid, x, feats, mask = inputs[dt]
            return sample(model, x, feats, mask, grid=grid, steps=1, cfg=1.0, exact=False, dtype=dt)

        def time_pair(label, model, dt, reference):
            """Interleaved runs of the fp32 baseline and ``model``: medians (wall, cpu) of both."""
            t = {"ref": [], "ref_cpu": [], "m": [], "m_cpu": []}
            with torch.inference_mode():
                ref_out = step(base, torch.float32).float()
                out = step(model, dt).float()
                for _ in range(args.runs):
                    for key, fn in (("ref", lambda: step(base, torch.float32)), ("m", lambda: step(model, dt))):
                        w0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        t[key].append(time.perf_counter() - w0)
                        t[key + "_cpu"].append(time.process_time() - c0)
            med = {k: statistics.median(v) for k, v in t.items()}
            err = float((out - ref_out).norm() / ref_out.norm())
            rows.append({"storage": label, "act": str(dt).replace("torch.", ""), "weights GB": _bytes(model) / 1e9,
                         "s/step": med["m"], "cpu s/step": med["m_cpu"], "fp32 s/step": med["ref"],
                         "fp32 cpu s/step": med["ref_cpu"], "× fp32 (wall)": med["m"] / med["ref"],
                         "× fp32 (cpu)": med["m_cpu"] / med["ref_cpu"], "rel diff to fp32": err,
                         "load avg": _load_avg().split()[0]})
            print(f"# {label} {dt}: {med['m']:.3g} s ({med['m'] / med['ref']:.3f} × fp32 wall, "
                  f"{med['m_cpu'] / med['ref_cpu']:.3f} × cpu), rel diff {err:.3g}", flush=True)

        time_pair("fp32 storage", base, torch.float32, True)
        time_pair("bf16 storage", bf16, torch.bfloat16, True)
        for spec in args.formats.split(","):
            name, opts = _options(spec)
            for dt in (getattr(torch, a) for a in args.act.split(",")):
                model = _quantized_copy(base, name, opts, dt, args.tiny)
                label = spec.replace("+", " ")
                time_pair(label, model, dt, False)
                del model
        print(f"# load average at end: {_load_avg()}")
        return rows
    finally:
        torch.set_num_threads(threads)
