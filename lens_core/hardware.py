"""Run-device and run-dtype choice from the hardware (no model code).

bf16 is only worth it where the hardware computes it natively: on CUDA when ``torch.cuda.is_bf16_supported()``,
on x86 CPUs with AMX-BF16 or AVX512-BF16 (oneDNN then runs bf16 GEMMs natively). Elsewhere a CPU emulates
bf16 and is many times slower than fp32 (measured: the tiny pipeline's VAE decode at 384×256 took 35.4 s in
bf16 vs 2.5 s in fp32 on an AVX2-only EPYC), so fp32 is chosen there. fp16 is never chosen: Lens overflows
in fp16.
"""
from __future__ import annotations

import os
import platform

import torch

#: /proc/cpuinfo flags that mean the CPU computes bf16 natively (AMX tiles or AVX-512 BF16 instructions).
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_value(keys, cpuinfo: str) -> str | None:
    """The value of the first of ``keys`` for the first processor in ``cpuinfo`` (Linux); None where absent."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The CPU feature flags of the first processor in ``cpuinfo`` (Linux); empty where there is none."""
    return frozenset((_cpuinfo_value(("flags", "Features"), cpuinfo) or "").split())


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``vendor_id`` of the first processor (``AuthenticAMD``, ``GenuineIntel``…); "" where unknown."""
    return _cpuinfo_value(("vendor_id",), cpuinfo) or ""


def onednn_fp32_gemm_preferred(flags=None, vendor=None) -> bool:
    """Whether fp32 Linear layers on this CPU should go through oneDNN rather than torch's default (MKL).

    Measured (BENCHMARKS.md, DiT): on an AMD EPYC with AVX-512 oneDNN's fp32 GEMMs ran 11–30 % faster than
    MKL's on the DiT's shapes, at 1 and 2 threads; on an AVX2-only AMD EPYC no back-end beat MKL beyond the
    noise. Unmeasured CPUs (Intel, ARM) keep the default. ``LENS_ONEDNN_LINEAR=1``/``0`` forces the choice.
    """
    forced = os.environ.get("LENS_ONEDNN_LINEAR", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags() if flags is None else set(flags)
    vendor = cpu_vendor() if vendor is None else vendor
    return vendor == "AuthenticAMD" and "avx512f" in flags


def cpu_has_native_bf16(flags=None) -> bool:
    """True when the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16). ``flags``: a set of /proc/cpuinfo
    flags (default: this machine's)."""
    flags = cpu_flags() if flags is None else set(flags)
    return any(f in flags for f in NATIVE_BF16_CPU_FLAGS)


def resolve_device(device=None) -> torch.device:
    """``"auto"``/None → cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_dtype(device, cpu_flags_=None, cuda_bf16=None) -> tuple[torch.dtype, str]:
    """(dtype, reason) for running Lens on ``device``: bf16 where the hardware has native bf16, else fp32.

    ``cpu_flags_`` (a set of /proc/cpuinfo flags) and ``cuda_bf16`` (bool) replace the detection (tests).
    """
    device = resolve_device(device)
    if device.type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if cuda_bf16:
            return torch.bfloat16, "CUDA device with bf16 support"
        return torch.float32, "CUDA device without bf16 support (fp16 overflows with Lens)"
    if device.type == "cpu":
        flags = cpu_flags() if cpu_flags_ is None else frozenset(cpu_flags_)
        native = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
        if native:
            return torch.bfloat16, f"CPU with native bf16 ({', '.join(native)})"
        arch = platform.machine() or "this CPU"
        return torch.float32, (f"CPU without AMX-BF16 / AVX512-BF16 ({arch}): bf16 would be emulated and many "
                               f"times slower; pass --dtype bf16 to force it")
    return torch.float32, f"{device.type} device"


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16" / "fp32" / … for messages."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))
