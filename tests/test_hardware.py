"""Run-dtype choice from the hardware (lens_core.hardware), with the CPU flags and CUDA support faked."""
from __future__ import annotations

import pytest
import torch

from lens_core import hardware as hw
from lens_core.pipeline import resolve_dtype

AVX2_EPYC = "fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx avx2 f16c bmi2 sha_ni"
SAPPHIRE_RAPIDS = AVX2_EPYC + " avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
COOPER_LAKE = AVX2_EPYC + " avx512f avx512bw avx512_bf16"
ICE_LAKE = AVX2_EPYC + " avx512f avx512bw avx512_vnni"          # AVX-512 but no bf16 instructions


@pytest.mark.parametrize("flags, dtype, why", [
    (AVX2_EPYC, torch.float32, "without AMX-BF16 / AVX512-BF16"),
    (ICE_LAKE, torch.float32, "without AMX-BF16 / AVX512-BF16"),
    (COOPER_LAKE, torch.bfloat16, "native bf16 (avx512_bf16)"),
    (SAPPHIRE_RAPIDS, torch.bfloat16, "native bf16 (amx_bf16, avx512_bf16)"),
    ("", torch.float32, "without AMX-BF16"),
])
def test_cpu_dtype_from_flags(flags, dtype, why):
    got, reason = hw.choose_dtype("cpu", cpu_flags_=flags.split())
    assert got == dtype and why in reason, reason


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_cuda_dtype(bf16, dtype):
    got, reason = hw.choose_dtype("cuda", cpu_flags_=AVX2_EPYC.split(), cuda_bf16=bf16)
    assert got == dtype and "CUDA" in reason
    # the CPU flags do not matter on CUDA
    assert hw.choose_dtype("cuda", cpu_flags_=SAPPHIRE_RAPIDS.split(), cuda_bf16=bf16)[0] == dtype


def test_cpuinfo_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {SAPPHIRE_RAPIDS}\n\n"
                    f"processor\t: 1\nflags\t\t: {SAPPHIRE_RAPIDS}\n")
    flags = hw.cpu_flags(str(info))
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= flags and hw.cpu_has_native_bf16(flags)
    assert hw.cpu_flags(str(tmp_path / "missing")) == frozenset()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n")
    assert hw.cpu_flags(str(arm)) == {"fp", "asimd", "evtstrm", "aes"} and not hw.cpu_has_native_bf16(hw.cpu_flags(str(arm)))


def test_this_machine_and_overrides(monkeypatch):
    """auto follows this machine's /proc/cpuinfo; an explicit dtype always wins."""
    dtype, reason = resolve_dtype("auto", torch.device("cpu"))
    assert dtype == (torch.bfloat16 if hw.cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype(None, torch.device("cpu"))[0] == dtype
    monkeypatch.setattr(hw, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset(SAPPHIRE_RAPIDS.split()))
    assert hw.choose_dtype("cpu")[0] == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) == (torch.float32, "requested")
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == (torch.bfloat16, "requested")
    with pytest.raises(ValueError, match="dtype: expected 'auto', torch.bfloat16 or torch.float32"):
        resolve_dtype(torch.int8, torch.device("cpu"))


def test_onednn_gemm_choice(tmp_path, monkeypatch):
    """oneDNN fp32 GEMMs only where measured faster (AMD with AVX-512); LENS_ONEDNN_LINEAR forces it."""
    monkeypatch.delenv("LENS_ONEDNN_LINEAR", raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert hw.cpu_vendor(str(info)) == "AuthenticAMD" and hw.cpu_vendor(str(tmp_path / "none")) == ""
    flags = hw.cpu_flags(str(info))
    assert hw.onednn_fp32_gemm_preferred(flags, "AuthenticAMD")
    assert not hw.onednn_fp32_gemm_preferred({"avx2", "fma"}, "AuthenticAMD")  # AVX2 EPYC: MKL was as fast
    assert not hw.onednn_fp32_gemm_preferred(flags, "GenuineIntel")  # not measured: keep torch's default
    monkeypatch.setenv("LENS_ONEDNN_LINEAR", "1")
    assert hw.onednn_fp32_gemm_preferred({"avx2"}, "GenuineIntel")
    monkeypatch.setenv("LENS_ONEDNN_LINEAR", "0")
    assert not hw.onednn_fp32_gemm_preferred(flags, "AuthenticAMD")
