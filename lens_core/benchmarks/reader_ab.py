"""A/B of two checkpoint readers in the same conditions (issue 12: positioned reads vs the earlier memory map).

    python -m lens_core.benchmarks.reader_ab OLD_REPO NEW_REPO [--dir /tmp/lens_reader_ab]

Writes a 2.4 GB bf16 file and a 2.4 GB fp32 file (48 / 24 random [4096, 6144] tensors), then for each file and
two repetitions: one plain read (64 MB ``readinto``) from a cold page cache, and a load into bf16 with each
repository's reader (``open_source`` + the read-ahead helper, in file order, as ``assign_weights`` does) in a
fresh interpreter from a cold page cache, alternating which reader goes first. Prints one row per load:
file, repetition, repository, read-once seconds, load seconds, load / read, load average. (Peak RSS is measured
by ``--component load --mode memory``; a child's ``ru_maxrss`` here would include this parent's.)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

_CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from lens_core.checkpoints import open_source
from lens_core import readahead
src = open_source(sys.argv[2])
t = time.perf_counter()
order = sorted(src.keys(), key=src.location)
spans = [src.span(n) or readahead.Span(0, -1, 0, 0) for n in order]
keep = []
with readahead.ReadAhead(spans) as ahead:
    for i, n in enumerate(order):
        if not ahead.active and i + 1 < len(order):
            src.prefetch(order[i + 1])
        keep.append(src.read(n, torch.bfloat16, "cpu"))
        ahead.consumed(i)
print(time.perf_counter() - t)
"""


def _drop(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _read_once(path) -> float:
    _drop(path)
    buf = bytearray(64 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--dir", default="/tmp/lens_reader_ab")
    args = ap.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    os.makedirs(args.dir, exist_ok=True)
    files = {"bf16": (os.path.join(args.dir, "bf16.safetensors"), torch.bfloat16, 48),
             "fp32": (os.path.join(args.dir, "fp32.safetensors"), torch.float32, 24)}
    try:
        for name, (path, dtype, n) in files.items():
            g = torch.Generator().manual_seed(0)
            save_file({f"t{i}": torch.randn(4096, 6144, generator=g).to(dtype) for i in range(n)}, path)
        print("file | rep | reader | read_once_s | load_s | load/read | loadavg")
        for name, (path, _dtype, _n) in files.items():
            for rep in range(2):
                once = _read_once(path)
                for repo in ((args.old, args.new) if rep == 0 else (args.new, args.old)):
                    _drop(path)
                    out = subprocess.run([sys.executable, "-c", _CHILD, repo, path], capture_output=True, text=True,
                                         check=True)
                    t = float(out.stdout.split()[-1])
                    print(f"{name} | {rep} | {repo} | {once:.2f} | {t:.2f} | {t / once:.3f} | "
                          f"{os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for path, _d, _n in files.values():
            if os.path.exists(path):
                os.unlink(path)


if __name__ == "__main__":
    main()
