"""Running a test script inside a real ComfyUI (for the tests marked ``comfyui``).

:func:`run_script` writes ``PRELUDE + body`` to a file and runs it with the ComfyUI checkout's Python through
../shared/tools/comfyui_headless.sh; the script prints one JSON line last, which is returned. The prelude sets
ComfyUI to CPU, imports this repository as the custom-node package ``lens_nodes_test`` (as ComfyUI loads a
custom-node folder) and defines ``repo``, ``golden``, ``tmp`` (the script's first three arguments; further ones
are in ``sys.argv[4:]``), ``pack``, ``N`` (its NODE_CLASS_MAPPINGS) and ``out(r)`` (a V3 node's NodeOutput → its
result tuple).
"""
from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from conftest import comfyui_dir_or_skip

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = (REPO.parent / "shared" / "tools" / "comfyui_headless.sh").resolve()

PRELUDE = r'''
import importlib.util, json, os, sys, torch
repo, golden, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_base, comfy.model_management as mm, comfy.utils, folder_paths
spec = importlib.util.spec_from_file_location("lens_nodes_test", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_test"] = pack; spec.loader.exec_module(pack)
N = pack.NODE_CLASS_MAPPINGS

def out(r):
    return r.result if hasattr(r, "result") else r
'''


def run_script(body: str, tmp: pathlib.Path, golden_dir, *extra_args: str, timeout: int = 900) -> dict:
    """Run ``PRELUDE + body`` in the ComfyUI of COMFYUI_DIR (skip when unset) with the arguments repo, golden,
    ``tmp/models`` and ``extra_args``; the last stdout line as JSON."""
    script = tmp / "script.py"
    script.write_text(PRELUDE + body)
    r = subprocess.run(["bash", str(TOOL), "python", comfyui_dir_or_skip(), str(script), str(REPO), str(golden_dir),
                        str(tmp / "models"), *map(str, extra_args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    return res


def native_or_skip(result: dict) -> dict:
    """``result`` when the script's ComfyUI has the native Lens model (``result["native"]``), else skip."""
    if not result["native"]:
        pytest.skip("this ComfyUI has no native Lens model (comfy.model_base.Lens arrived in ComfyUI 0.33)")
    return result
