"""Benchmark of checkpoint loading (issue 6): real-size memory/time, and the MXFP8 on-the-fly vs at-load choice.

``--mode memory`` (default) writes a random real-config Lens DiT (4,104,225,152 parameters, the real 1264 key
names and shapes) to ``--dir`` as

* ``fp32_sharded/``: the diffusers layout, fp32 shards + ``diffusion_pytorch_model.safetensors.index.json``
  (16.4 GB), loaded as bf16;
* ``lens_bf16.safetensors``: the Comfy-Org single-file layout, bf16 (8.2 GB), loaded as bf16;

then, per layout, in a fresh process each: drops the file from the page cache (``posix_fadvise DONTNEED``),
times one plain sequential read of the files, drops them again and times ``load_transformer``, recording the
peak RSS of that process against the resident weights (column ``readahead``: what the background read-ahead
helper did; ``--compare-readahead`` adds a row per layout with the helper switched off). Files are deleted at
the end unless ``--keep``.
Needs ≈ 25 GB free disk and ≈ 9 GB free RAM. Not part of CI.

``--mode mxfp8`` compares one real-size MXFP8 Linear kept packed (dequantized per call) with the same layer
dequantized to bf16 at load: forward time for ``--tokens`` image tokens and resident bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

from lens_core.bench import median_time

ST = {torch.float32: "F32", torch.bfloat16: "BF16"}


def add_arguments(parser):
    parser.add_argument("--mode", choices=["memory", "mxfp8"], default="memory")
    parser.add_argument("--dir", default="/tmp/lens_load_bench", help="where the random checkpoints are written")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="max shard size of the fp32 layout")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--layouts", default="fp32_sharded,bf16_single")
    parser.add_argument("--compare-readahead", action="store_true",
                        help="also load each layout with the background read-ahead helper switched off")
    parser.add_argument("--tokens", type=int, default=4096, help="mxfp8 mode: tokens per forward (1024² = 4096)")
    parser.add_argument("--compare-finite", action="store_true",
                        help="also load each layout without the finite check of the weights, with it at load and "
                             "with the default (DiT: at the first forward), cold and warm page cache")
    parser.add_argument("--blocks", type=int, default=None,
                        help="write only the first N of the 48 blocks (real shapes; for machines without the RAM "
                             "for the whole model: every cost here is linear in the bytes)")


# --------------------------------------------------------------------------------------------------
# writing a random real-size DiT without holding it in memory
# --------------------------------------------------------------------------------------------------
def real_shapes() -> dict:
    from lens_core.checkpoints import init_empty_weights
    from lens_core.config import REAL_DIT_CONFIG
    from lens_core.dit import LensTransformer

    with init_empty_weights():
        model = LensTransformer(REAL_DIT_CONFIG, dtype=torch.float32)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _random(name, shape, gen):
    t = torch.empty(shape)
    if len(shape) == 1 and "norm" in name:
        return t.fill_(1.0)
    return t.normal_(0.0, 0.02, generator=gen)


def write_entries(path, entries, metadata=None) -> int:
    """A safetensors file written tensor by tensor (header first, then each tensor as ``make()`` returns it, so
    only one tensor is ever in memory). ``entries``: [(name, shape, safetensors dtype, make)]; returns the data
    bytes."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1}
    header, off = {}, 0
    for name, shape, st, _ in entries:
        nbytes = sizes[st]
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, st, make in entries:
            t = make()
            if tuple(t.shape) != tuple(shape) or t.element_size() != sizes[st]:
                raise ValueError(f"write_entries: {name} made {tuple(t.shape)} {t.dtype}, declared {shape} {st}")
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    return off


def write_streaming(path, names: list, shapes: dict, dtype, gen) -> int:
    """A random DiT safetensors file written tensor by tensor (header first); returns the data bytes."""
    return write_entries(path, [(n, shapes[n], ST[dtype], lambda n=n: _random(n, shapes[n], gen).to(dtype))
                                for n in names])


def write_fp32_sharded(folder, shapes, shard_bytes):
    from lens_core.config import REAL_DIT_CONFIG

    os.makedirs(folder, exist_ok=True)
    names = sorted(shapes)
    groups, cur, size = [], [], 0
    for n in names:
        b = 4
        for d in shapes[n]:
            b *= d
        if cur and size + b > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    groups.append(cur)
    gen = torch.Generator().manual_seed(0)
    wm, total = {}, 0
    for i, g in enumerate(groups, 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_streaming(os.path.join(folder, fname), g, shapes, torch.float32, gen)
        wm.update({n: fname for n in g})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(REAL_DIT_CONFIG.to_dict(), _class_name="LensTransformer2DModel"), f)
    return [os.path.join(folder, "diffusion_pytorch_model-%05d-of-%05d.safetensors" % (i, len(groups)))
            for i in range(1, len(groups) + 1)]


# --------------------------------------------------------------------------------------------------
# measurements (each in a fresh process)
# --------------------------------------------------------------------------------------------------
def drop_cache(files):
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_once(files) -> float:
    """Seconds for one plain sequential read of ``files`` from a cold page cache."""
    drop_cache(files)
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


_LOAD_CHILD = """
import json, os, resource, sys, time
import torch
from lens_core.benchmarks.load import drop_cache
from lens_core.checkpoints import load_transformer
from lens_core import readahead
helper, device, warm, forward = sys.argv[1] == "1", sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
path, files = sys.argv[5], sys.argv[6:]
if not helper:
    readahead.available = lambda: False
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
if warm:
    for p in files:
        with open(p, 'rb', buffering=0) as f:
            while f.read(64 << 20):
                pass
else:
    drop_cache(files)
base = rss()
t0 = time.perf_counter()
model = load_transformer(path, dtype=torch.bfloat16, device=device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
resident = sum(p.numel() * p.element_size() for p in model.parameters())
from lens_core import finite
fwd = []
if forward:     # two forwards at 512² (1024 image tokens, 64 text tokens): the first runs the first-use check
    cfg = model.config
    x = torch.randn(1, 1024, cfg.in_channels, dtype=torch.bfloat16, device=device)
    feats = torch.randn(1, 64, cfg.num_text_layers * cfg.enc_hidden_dim, dtype=torch.bfloat16, device=device)
    mask = torch.ones(1, 64, dtype=torch.bool, device=device)
    for _ in range(2):
        t1 = time.perf_counter()
        with torch.no_grad():
            model(x, feats, mask, torch.tensor([0.5], device=device), grid=(32, 32), exact=False)
        fwd.append(time.perf_counter() - t1)
print(json.dumps(dict(load_s=dt, resident=resident, tensors=len(model.state_dict()), baseline=base,
                      check_s=finite.STATS["seconds"], checked_GB=finite.STATS["bytes"] / 1e9,
                      first_use_check_s=finite.STATS.get("first_use_seconds", 0.0), forwards_s=fwd,
                      after=rss(), peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      readahead=readahead.mode() if helper else "off")))
"""


def load_in_fresh_process(path, files, helper: bool = True, device: str = "cpu", check="1",
                          warm: bool = False, forward: bool = False) -> dict:
    """``load_transformer(path, bf16, device)`` in a new interpreter (spawned, not forked: a fork of a process that ran
    torch thread pools can deadlock); returns its timings and RSS figures. ``check``: ``LENS_CHECK_WEIGHTS``
    ("0" no finite check, "1" the default, "load" the DiT checked at load); ``warm``: the files read into the page
    cache first; ``forward``: two forwards after loading (the first one runs the first-use checks)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LENS_CHECK_WEIGHTS=str(check))
    argv = [sys.executable, "-c", _LOAD_CHILD, "1" if helper else "0", str(device), "1" if warm else "0",
            "1" if forward else "0", path, *files]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(args):
    os.makedirs(args.dir, exist_ok=True)
    shapes = real_shapes()
    if args.blocks is not None:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("transformer_blocks.")
                  or int(k.split(".")[1]) < args.blocks}
    rows = []
    try:
        for layout in args.layouts.split(","):
            t0 = time.perf_counter()
            if layout == "fp32_sharded":
                path = os.path.join(args.dir, "transformer")
                files = write_fp32_sharded(path, shapes, int(args.shard_gb * 1e9))
            elif layout == "bf16_single":
                path = os.path.join(args.dir, "lens_bf16.safetensors")
                write_streaming(path, sorted(shapes), shapes, torch.bfloat16, torch.Generator().manual_seed(0))
                files = [path]
            else:
                raise SystemExit(f"unknown layout {layout!r}")
            write_s = time.perf_counter() - t0
            size = sum(os.path.getsize(f) for f in files)
            for helper in ((True, False) if args.compare_readahead else (True,)):
                rows.append(_measure(layout, files, path, size, write_s, helper, args.device))
            if args.compare_finite:
                for warm in (False, True):
                    for check in ("0", "load", "1"):
                        r = load_in_fresh_process(path, files, True, args.device, check=check, warm=warm,
                                                  forward=warm and check == "1")
                        row = {"layout": layout, "file_GB": size / 1e9, "cache": "warm" if warm else "cold",
                               "LENS_CHECK_WEIGHTS": check, "load_s": r["load_s"],
                               "check_at_load_s": r["check_s"], "check_at_load/load": r["check_s"] / r["load_s"],
                               "resident_GB": r["resident"] / 1e9}
                        if r["forwards_s"]:
                            row.update({"first_use_check_s": r["first_use_check_s"],
                                        "forward1_s (incl. check)": r["forwards_s"][0],
                                        "forward2_s": r["forwards_s"][1],
                                        "check/forward2": r["first_use_check_s"] / r["forwards_s"][1]})
                        rows.append(row)
            if not args.keep:
                for f in files:
                    os.remove(f)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return rows


def _measure(layout, files, path, size, write_s, helper, device="cpu") -> dict:
    read_s = read_once(files)
    r = load_in_fresh_process(path, files, helper, device)
    return {"layout": layout, "files": len(files), "file_GB": size / 1e9, "write_s": write_s,
            "read_once_s": read_s, "load_s": r["load_s"], "load/read": r["load_s"] / read_s,
            "tensors": r["tensors"], "resident_GB": r["resident"] / 1e9,
            "baseline_rss_GB": r["baseline"] / 1e9, "peak_rss_GB": r["peak"] / 1e9,
            "peak/resident": r["peak"] / r["resident"],
            "(peak-baseline)/resident": (r["peak"] - r["baseline"]) / r["resident"],
            "readahead": r["readahead"]}


def run_mxfp8(args):
    from lens_core import quant_linear as ql

    torch.manual_seed(0)
    rows = []
    for out_f, in_f in ((4096, 1536), (1536, 4096), (9216, 1536)):
        w = torch.randn(out_f, in_f) * 0.02
        data, e = ql.quantize_mxfp8(w)
        packed = ql.MXFP8Linear(in_f, out_f, bias=True, dtype=torch.bfloat16)
        packed.weight.data, packed.weight_scale.data = data, e
        packed.bias.data = torch.zeros(out_f, dtype=torch.bfloat16)
        dense = torch.nn.Linear(in_f, out_f, dtype=torch.bfloat16)
        dense.weight.data = ql.dequantize_mxfp8(data, e, torch.bfloat16)
        dense.bias.data = packed.bias.data.clone()
        packed, dense = packed.to(args.device), dense.to(args.device)
        x = torch.randn(1, args.tokens, in_f, dtype=torch.bfloat16).to(args.device)
        sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else None
        with torch.no_grad():
            t_packed = median_time(lambda: packed(x), runs=args.runs, sync=sync)
            t_dense = median_time(lambda: dense(x), runs=args.runs, sync=sync)
            t_deq = median_time(lambda: packed.dequantized_weight(torch.bfloat16), runs=args.runs, sync=sync)
            same = torch.equal(packed(x), dense(x))
        rows.append({"layer": f"[{out_f},{in_f}]", "tokens": args.tokens, "on_the_fly_ms": t_packed * 1e3,
                     "at_load_bf16_ms": t_dense * 1e3, "dequant_only_ms": t_deq * 1e3,
                     "overhead": t_packed / t_dense - 1, "packed_MB": (data.numel() + e.numel()) / 1e6,
                     "bf16_MB": out_f * in_f * 2 / 1e6, "equal_outputs": same})
    return rows


def run(args):
    return run_mxfp8(args) if args.mode == "mxfp8" else run_memory(args)
