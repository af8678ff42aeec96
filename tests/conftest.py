"""Shared pytest fixtures: the golden reference folder and the rebuilt o200k_harmony tokenizer."""
from __future__ import annotations

import os
import pathlib
import shutil
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# ../shared/golden beside the repository; LENS_GOLDEN_DIR points elsewhere (used by the test of this rule)
GOLDEN = pathlib.Path(os.environ.get("LENS_GOLDEN_DIR") or REPO.parent / "shared" / "golden").resolve()


def in_ci() -> bool:
    """CI runs set CI=true (.ci/run on the CI machine; GitHub Actions and most other CI services too)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def golden_missing_message() -> str:
    return (f"golden reference data not found at {GOLDEN} (expected ../shared/golden beside the repo, or "
            f"LENS_GOLDEN_DIR)")
# The repo root's parent must be importable so that the pack imports as a package in node tests;
# the repo root itself makes ``lens_core`` importable.
for p in (str(REPO),):
    if p not in sys.path:
        sys.path.insert(0, p)


def pytest_sessionstart(session):
    """Under CI a missing golden folder fails the run at once (outside CI the tests that need it are skipped)."""
    if in_ci() and not GOLDEN.is_dir():
        pytest.exit(f"{golden_missing_message()}; CI=true: missing golden data fails the run instead of skipping "
                    f"most of the suite", returncode=1)


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs a real ComfyUI checkout in COMFYUI_DIR")
    config.addinivalue_line("markers", "slow: longer end-to-end test")


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN.is_dir():
        if in_ci():
            pytest.fail(f"{golden_missing_message()}; CI=true: missing golden data is an error", pytrace=False)
        pytest.skip(golden_missing_message())
    return GOLDEN


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> pathlib.Path:
    """The real o200k_harmony tokenizer.json, rebuilt offline once per test run (28 MB, never committed)."""
    from tokenizer_build import build_o200k_harmony

    out = tmp_path_factory.mktemp("o200k_harmony") / "tokenizer.json"
    build_o200k_harmony(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer_json, golden_dir, tmp_path_factory) -> pathlib.Path:
    """pipeline_tiny/tokenizer with the rebuilt tokenizer.json added (a complete tokenizer folder)."""
    out = tmp_path_factory.mktemp("tokenizer")
    for f in (golden_dir / "pipeline_tiny" / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    shutil.copy(tokenizer_json, out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def pipeline_dir(tokenizer_dir, golden_dir, tmp_path_factory) -> pathlib.Path:
    """A complete tiny diffusers Lens folder: pipeline_tiny with tokenizer.json in place.

    Weight files are symlinked, not copied (the golden folder is read-only and 45 MB).
    """
    out = tmp_path_factory.mktemp("pipeline_tiny") / "Lens-tiny"
    src = golden_dir / "pipeline_tiny"
    out.mkdir()
    for entry in src.iterdir():
        if entry.name == "tokenizer":
            shutil.copytree(tokenizer_dir, out / "tokenizer")
        elif entry.name == "cases":
            continue
        else:
            os.symlink(entry, out / entry.name)
    return out


def comfyui_dir_or_skip() -> str:
    """The real ComfyUI checkout for tests marked ``comfyui`` (COMFYUI_DIR), or skip (under CI the skip of a comfyui
    test is a failure: :func:`pytest_runtest_makereport`)."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("COMFYUI_DIR not set (real-ComfyUI integration tests); .ci/run sets one up, -m 'not comfyui' "
                    "deselects them")
    if not os.path.isfile(os.path.join(comfy_dir, ".venv", "bin", "python")):
        pytest.fail(f"COMFYUI_DIR={comfy_dir} has no .venv/bin/python: expected a ComfyUI set up with "
                    f"../shared/tools/comfyui_headless.sh setup <archive> <dir>", pytrace=False)
    return comfy_dir


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skipped ``comfyui`` test is a failure: CI runs them against the verified ComfyUI (0.33), where
    every one of them must run (a version-dependent skip is only legitimate on older ComfyUIs run by hand)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and item.get_closest_marker("comfyui") is not None \
            and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a comfyui test may not skip ({reason})"


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would use on the CPU (``$CXX``, else g++ / c++ / clang++)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(params=["compiled", "table"])
def matvec_kernel(request, monkeypatch):
    """The packed one-token matvec kernel under test (``quant.mxfp4_matvec``): the compiled one (needs a C++
    compiler: skipped without one) or the product table. Yields the fresh kernel state; with "compiled" the
    test asserts through ``state.checked`` that the compiled code really ran."""
    from lens_core import quant

    state = quant._CompiledMatvec()
    state.enabled = request.param == "compiled"
    if state.enabled and cxx_compiler() is None:
        pytest.skip("no C++ compiler here for torch.compile's inductor (the compiled kernel falls back to the "
                    "table kernel, which the 'table' case tests)")
    if state.enabled:
        import torch

        torch._dynamo.reset()   # dynamo's per-function recompile limit counts every shape of the whole run
    monkeypatch.setattr(quant, "_COMPILED_MATVEC", state)
    return state
