"""``pip install .`` / a wheel installs ``lens_core`` as a package (issue 25 part 2).

The wheel is built from a copy of the tracked files (``pip wheel --no-build-isolation``: no network), its file
list is checked (the core with its data file and console script; never the ComfyUI layer), and it is installed
into a temporary target from which ``import lens_core`` and ``python -m lens_core`` work in an unrelated folder:
the README's Python example and a PNG's stored regenerate command run there.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest  # noqa: F401  (fixtures)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tracked_copy(dest: pathlib.Path) -> pathlib.Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True)
    if files.returncode != 0:
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts
                 and "__pycache__" not in p.parts]
    else:
        names = files.stdout.splitlines()
    for name in names:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = _tracked_copy(tmp_path_factory.mktemp("src") / "lens-nodes")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("lens_nodes-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_core_and_its_data_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    core = {n for n in names if n.startswith("lens_core/")}
    for need in ("lens_core/__init__.py", "lens_core/__main__.py", "lens_core/pipeline.py",
                 "lens_core/checkpoints/__init__.py", "lens_core/data/lens_reasoner_prompt.json"):
        assert need in core, need
    # every module of the source tree is in the wheel (subpackages added later included)
    for path in (REPO / "lens_core").rglob("*.py"):
        assert path.relative_to(REPO).as_posix() in core, path
    # never the ComfyUI layer, the tests or the repository root's __init__.py
    others = [n for n in names if not n.startswith(("lens_core/", "lens_nodes-"))]
    assert others == [], others
    dist = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry = zipfile.ZipFile(wheel).read(dist).decode()
    assert "lens = lens_core.__main__:main" in entry
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: torch" not in meta.split("Provides-Extra")[0], "torch must stay an extra"


def test_pyproject_version_is_the_package_version():
    import tomllib

    import lens_core

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["version"] == lens_core.__version__


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel installed into a fresh target folder: (target, an unrelated working folder, the environment
    that sees the installed lens_core and not the repository)."""
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    return target, elsewhere, env


def test_installed_package_runs_from_another_folder(installed):
    target, elsewhere, env = installed
    code = ("import lens_core, lens_core.enhance as e, lens_core.pipeline as p; print(lens_core.__file__); "
            "print(len(e.system_message()) > 100); print(p.LensPipeline.__name__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    where, data_ok, cls = r.stdout.split()
    assert pathlib.Path(where).is_relative_to(target), where
    assert data_ok == "True" and cls == "LensPipeline"
    r = subprocess.run([sys.executable, "-m", "lens_core", "--help"], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "generate" in r.stdout, r.stderr
    script = target / "bin" / "lens"
    assert script.is_file(), sorted(p.name for p in target.iterdir())


def test_readme_example_and_png_regenerate_command_run_elsewhere(installed, pipeline_dir):
    """After the install, from an unrelated folder: the README's Python example (on the tiny model, one step
    at 1024²) runs, ``python -m lens_core generate`` writes a PNG, and the regenerate command stored in that
    PNG, run as it is (only ``--out`` changed), gives the same pixels."""
    import json
    import shlex

    from PIL import Image

    target, elsewhere, env = installed
    example = ("from lens_core.pipeline import LensPipeline\n"
               f"pipe = LensPipeline.from_pretrained({str(pipeline_dir)!r}, device='auto')\n"
               "out = pipe('a red cube on a wooden table', aspect='1:1', base=1024, seed=0, steps=1)\n"
               "import lens_core; print(lens_core.__file__, out.images[0].size, tuple(out.latents.shape))")
    r = subprocess.run([sys.executable, "-c", example], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    where, *_ = r.stdout.split()
    assert pathlib.Path(where).is_relative_to(target), where
    assert "(1024, 1024)" in r.stdout, r.stdout
    first = elsewhere / "first.png"
    r = subprocess.run([sys.executable, "-m", "lens_core", "generate", "--model", str(pipeline_dir), "--prompt",
                        "two green frogs", "--height", "32", "--width", "48", "--steps", "2", "--seed", "7",
                        "--dtype", "fp32", "--out", str(first)], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    argv = shlex.split(json.loads(Image.open(first).text["lens"])["command"])
    assert argv[:4] == ["python", "-m", "lens_core", "generate"], argv
    argv[argv.index("--out") + 1] = str(elsewhere / "again.png")
    r = subprocess.run([sys.executable, *argv[1:]], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(elsewhere / "again.png").tobytes() == Image.open(first).tobytes()
