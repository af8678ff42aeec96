"""Shared pytest fixtures: the golden reference folder and the rebuilt o200k_harmony tokenizer."""
from __future__ import annotations

import os
import pathlib
import shutil
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = (REPO.parent / "shared" / "golden").resolve()
# The repo root's parent must be importable so that the pack imports as a package in node tests;
# the repo root itself makes ``lens_core`` importable.
for p in (str(REPO),):
    if p not in sys.path:
        sys.path.insert(0, p)


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs a real ComfyUI checkout in COMFYUI_DIR")
    config.addinivalue_line("markers", "slow: longer end-to-end test")


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden reference data not found at {GOLDEN} (expected ../shared/golden beside the repo)")
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
    """The real ComfyUI checkout for tests marked ``comfyui`` (COMFYUI_DIR), or skip."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("COMFYUI_DIR not set (real-ComfyUI integration tests)")
    return comfy_dir
