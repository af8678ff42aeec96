"""Benchmarks: ``python -m lens_core.bench --component dit|te|vae|load|pipeline|lora|gguf|enhance|batch|quantize|fit|quant [--device cpu|cuda] ...``

Prints a table (median of N runs, peak memory) and writes nothing by itself; results worth keeping are
copied into BENCHMARKS.md with the date, the machine and the command. Each component lives in
``lens_core/benchmarks/<component>.py`` and defines ``add_arguments(parser)`` and ``run(args) -> rows``
(a list of dicts, one per table row). Shared helpers (timing, peak RSS in a fresh child process, the
machine's matmul rate, table printing) are here.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import os
import platform
import queue as queue_module
import resource
import statistics
import sys
import time

COMPONENTS = ("dit", "te", "vae", "load", "pipeline", "lora", "gguf", "enhance", "batch", "quantize", "fit", "quant")


def median_time(fn, runs: int = 3, warmup: int = 1, sync=None) -> float:
    """Median wall time in seconds of ``fn()`` over ``runs`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _child(target, args, queue):
    try:
        result = target(*args)
        queue.put((True, result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    except BaseException as exc:  # report, do not hang the parent
        queue.put((False, repr(exc), 0))


def run_isolated(target, *args):
    """Run ``target(*args)`` in a fresh process; return (result, peak RSS bytes of that process).

    Peak RSS of a process never goes down, so each memory figure gets its own process. The process is spawned,
    not forked: a child forked after the parent ran a multi-threaded torch op (or a compiled kernel) can hang in
    its first parallel region (the OpenMP thread pool does not survive fork). ``target`` and its result must be
    picklable (module-level function, plain data).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, args, queue))
    proc.start()
    while True:
        try:
            ok, result, peak = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child died without a result (exit code {proc.exitcode})") from None
    proc.join()
    if not ok:
        raise RuntimeError(f"benchmark child failed: {result}")
    return result, peak


def matmul_rate(dtype_name: str = "float32", n: int = 2048, device: str = "cpu", runs: int = 3) -> float:
    """Achieved GFLOP/s of an n×n×n torch matmul in ``dtype_name`` on ``device`` (the machine's reference)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = median_time(lambda: a @ b, runs=runs, warmup=1, sync=sync)
    return 2 * n ** 3 / t / 1e9


def print_load(when: str) -> None:
    """Print the machine's 1/5/15-minute load average (``when``: "start" / "end")."""
    with open("/proc/loadavg") as f:
        print(f"# load average at {when}: {' '.join(f.read().split()[:3])}")


def machine_line() -> str:
    import torch

    return (f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
            f"torch {torch.__version__} threads {torch.get_num_threads()} | python {platform.python_version()}")


def device_name(device: str) -> str:
    """A human name of the compute device: the GPU's name, or the CPU model (with its vector extensions)."""
    import torch

    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            return f"CUDA not available (torch {torch.__version__})"
        return torch.cuda.get_device_name(torch.device(device))
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [e for e in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if e in flags]
    return f"{model} ({', '.join(ext) or 'no avx2'}, {os.cpu_count()} logical cores)"


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("(no rows)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lens_core.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--component", required=True, choices=COMPONENTS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure (median is printed)")
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(f"lens_core.benchmarks.{known.component}")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    print(f"# machine: {machine_line()}")
    print(f"# device: {args.device} = {device_name(args.device)}")
    print(f"# command: python -m lens_core.bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print_table(module.run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
