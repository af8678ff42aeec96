"""Package-level facts: lens_core imports without ComfyUI and never imports comfy."""
import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_lens_core_imports_without_comfy():
    code = "import sys, lens_core; assert 'comfy' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_every_lens_core_module_imports_with_comfyui_absent():
    """Every module of lens_core imports in a Python where ComfyUI's packages cannot be imported at all, and
    none of them pulls in comfy-kitchen (an optional library, imported on first use of a quantized format)."""
    code = ("import sys, importlib, pkgutil\n"
            "for n in ('comfy', 'folder_paths', 'nodes', 'comfy_extras', 'comfy_api'): sys.modules[n] = None\n"
            "import lens_core\n"
            "for m in pkgutil.walk_packages(lens_core.__path__, 'lens_core.'): importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k.startswith('comfy_kitchen')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_lens_core_never_imports_comfy():
    for path in (REPO / "lens_core").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("comfy", "folder_paths", "nodes", "comfy_extras"), f"{path}: imports {n}"


def test_requirements_never_pin_torch():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name = line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0].strip().lower()
        assert name not in ("torch", "torchvision", "torchaudio"), line


def test_pyproject_registry_fields():
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    proj = data["project"]
    assert "comfyui" not in proj["name"].lower()
    assert proj["requires-python"] == ">=3.10"
    assert proj["license"]["text"] == "MIT"
    assert "Repository" in proj["urls"]
    comfy = data["tool"]["comfy"]
    assert comfy["DisplayName"] == "Lens (Microsoft) nodes"
    assert comfy["PublisherId"] and "requires-comfyui" in comfy


def test_bench_helpers_print_a_table(capsys):
    from lens_core import bench

    t = bench.median_time(lambda: sum(range(1000)), runs=3, warmup=0)
    assert t >= 0
    bench.print_table([{"case": "x", "seconds": t}])
    assert "seconds" in capsys.readouterr().out


def test_suite_runs_in_a_clone_named_lens_nodes(tmp_path):
    """README clones into ``lens-nodes`` (not a Python identifier): pytest then imports the root __init__.py as a
    plain module, which must not fail (it did: every test errored with "attempted relative import")."""
    import os
    import shutil

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if files.returncode != 0:           # not a git checkout: copy the folder without .git
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts
                 and "__pycache__" not in p.parts]
    else:
        names = files.stdout.split()
    clone = tmp_path / "lens-nodes"
    for name in names:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, clone / name)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["LENS_GOLDEN_DIR"] = str(REPO.parent / "shared" / "golden")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_hardware.py::test_cuda_dtype"], cwd=clone, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout
