"""Where the bf16 goldens can be reproduced bit for bit, and the child process that tries.

The bf16 goldens were produced on a CPU whose oneDNN bf16 GEMMs ran AVX512-BF16 kernels (no AMX), one thread,
MKL in its compatible mode. The kernel choice changes a GEMM's fp32 accumulation order, so on an AMX machine a
bf16 forward differs in the last bit of some elements (measured: 1001 of 6144 outputs of io.safetensors differ
by ≤ 1 bf16 ulp-chain, max 0.016 abs). These choices are environment variables read at start-up, hence a child
process (:func:`run_exact`) with :data:`EXACT_ENV`; on a CPU with AVX512-BF16 the child runs the goldens'
kernels, so bit-for-bit equality is a fair claim there.

On a CPU **without** AVX512-BF16 the reference kernels do not exist: a bit-exact assertion would be a claim the
machine cannot check. Such tests call :func:`require_reference_kernels` and are **skipped with the reason**; each
has a separate test, named for what it checks (``..._within_bf16_tolerance``), that asserts the tolerance on every
CPU. ``LENS_TEST_NO_AVX512_BF16=1`` simulates such a CPU on one that has the instructions: the capability check
answers no and the child runs oneDNN's AVX2 kernels (``ONEDNN_MAX_CPU_ISA=AVX2``, bf16 emulated as on an AVX2-only
CPU), so the skip logic and the tolerances are exercised for real.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_FLAG = "avx512_bf16"
SIMULATE_ENV = "LENS_TEST_NO_AVX512_BF16"
EXACT_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
#: what the child runs with when an AVX2-only CPU is simulated
SIMULATED_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"}


def simulating() -> bool:
    return os.environ.get(SIMULATE_ENV, "").strip() not in ("", "0")


def reference_kernels(flags=None) -> tuple[bool, str]:
    """(whether this CPU has the goldens' bf16 kernels, why not). ``flags``: /proc/cpuinfo flags (default: this
    machine's, through :func:`lens_core.hardware.cpu_flags`)."""
    from lens_core import hardware

    if simulating():
        return False, f"{SIMULATE_ENV}=1 (a CPU without AVX512-BF16 simulated: oneDNN AVX2 kernels)"
    flags = hardware.cpu_flags() if flags is None else set(flags)
    if REFERENCE_FLAG not in flags:
        found = sorted(f for f in flags if "avx512" in f or "amx" in f) or "no AVX-512/AMX flags"
        return False, f"this CPU has no AVX512-BF16 ({found}): oneDNN runs other bf16 kernels here"
    return True, ""


def cpu_has_avx512_bf16() -> bool:
    return reference_kernels()[0]


def require_reference_kernels(what: str = "bit-exact bf16 golden comparison"):
    """Skip (with the reason) where the goldens' bf16 kernels are absent; the caller's tolerance test runs there."""
    ok, why = reference_kernels()
    if not ok:
        pytest.skip(f"{what} needs the goldens' AVX512-BF16 oneDNN kernels; {why}. The tolerance is checked by the "
                    f"..._within_bf16_tolerance test")


def child_env() -> dict:
    env = dict(os.environ, **(SIMULATED_ENV if simulating() else EXACT_ENV))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_exact(code: str, timeout: int = 300) -> dict:
    """Run ``code`` (its last stdout line must be JSON) in a child process with :data:`EXACT_ENV` (or the
    simulated AVX2 environment)."""
    prelude = "import torch\ntorch.set_num_threads(1)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], env=child_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"exactness child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
