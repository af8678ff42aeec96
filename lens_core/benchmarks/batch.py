"""Benchmark of ``python -m lens_core batch``: throughput with 1 and 2 workers, per-image overhead, resume.

``python -m lens_core.bench --component batch --model PATH [--jobs 12 --height 64 --width 96 --steps 4
--dtype fp32 --workers 1,2]``. Each row is a fresh ``python -m lens_core batch`` process on a fresh output folder:
"local" = in-process (one worker), "ray N" = a local Ray cluster with N one-CPU workers (``--ray
--cpus-per-worker 1 --threads 1``; skipped without Ray); "resume" = the in-process command run again (every job
skipped). Columns: ``command_s`` the whole command (Python start, validation, cluster start), ``run_s`` the
run itself as its summary prints it (worker start and model loads included), ``img_per_s`` = jobs / run_s,
``steady_img_per_s`` the rate once every worker has its model loaded (from the manifest's ``finished`` times),
``model_s`` the median time in the pipeline per image, ``worker_other_s`` the median per-image time a worker
spends outside the pipeline (validation, PNG encoding, the atomic write), ``steady_overhead_s`` = workers /
steady_img_per_s − model_s: per image, the worker time not spent in the model (worker_other_s plus scheduling
and waiting).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a diffusers Lens folder")
    parser.add_argument("--jobs", type=int, default=12, help="number of jobs (distinct seeds)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts (empty: none)")


def _batch(argv):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lens_core", "batch", *argv], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    command_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"batch exited {r.returncode}: {r.stderr[-2000:]}")
    m = re.search(r"; ([0-9.]+) s(,|$)", r.stderr.split("batch: ")[-1].splitlines()[0])
    return command_s, float(m.group(1))


def _row(label, workers, out, n, command_s, run_s):
    recs = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    model = statistics.median(r["timings"]["image_s"] for r in recs)
    other = statistics.median(r["timings"]["total_s"] - r["timings"]["image_s"] - r["timings"].get("load_s", 0)
                              for r in recs)
    ends = sorted(r["finished"] for r in recs)
    # steady state: from the moment every worker has finished its first image (its load) to the last image
    steady = (n - workers) / (ends[-1] - ends[workers - 1]) if n > workers and ends[-1] > ends[workers - 1] else 0
    return {"run": label, "workers": workers, "jobs": n, "command_s": command_s, "run_s": run_s,
            "img_per_s": n / run_s, "steady_img_per_s": steady, "model_s": model, "worker_other_s": other,
            "steady_overhead_s": workers / steady - model if steady else float("nan")}


def run(args):
    with tempfile.TemporaryDirectory(prefix="lens-batch-bench-") as tmp:
        jobs = os.path.join(tmp, "jobs.jsonl")
        with open(jobs, "w") as f:
            for s in range(args.jobs):
                f.write(json.dumps({"prompt": "a red cube on a wooden table", "seed": s, "name": f"img{s:04d}"}) + "\n")
        common = ["--model", args.model, "--height", str(args.height), "--width", str(args.width), "--steps",
                  str(args.steps), "--dtype", args.dtype, "--device", args.device]
        rows = []
        out = os.path.join(tmp, "local")
        command_s, run_s = _batch([jobs, "--out", out, "--threads", "1", *common])
        rows.append(_row("local", 1, out, args.jobs, command_s, run_s))
        command_s, run_s = _batch([jobs, "--out", out, "--threads", "1", *common])
        rows.append({"run": "resume (all skipped)", "workers": 0, "jobs": args.jobs, "command_s": command_s,
                     "run_s": run_s})
        try:
            import ray  # noqa: F401
        except ImportError:
            print("# ray not installed: Ray rows skipped")
            return rows
        for w in [int(x) for x in args.workers.split(",") if x]:
            out = os.path.join(tmp, f"ray{w}")
            command_s, run_s = _batch([jobs, "--out", out, "--threads", "1", "--ray", "--workers", str(w),
                                       "--cpus-per-worker", "1", *common])
            rows.append(_row(f"ray {w}", w, out, args.jobs, command_s, run_s))
        return rows
