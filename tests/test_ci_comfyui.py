"""CI runs the ``comfyui`` tests against a real ComfyUI (.ci/run): there a skipped comfyui test, a ComfyUI that
cannot be set up and an empty collection are failures. .ci/run is exercised on a miniature clone (a fake
../shared whose set-up tool succeeds or fails) so that these checks cost seconds, not a ComfyUI set-up."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

SKIPPING = '''import pytest

@pytest.mark.comfyui
def test_comfyui_skips():
    pytest.skip("no such ComfyUI feature")

def test_plain_skips():
    pytest.skip("optional environment")

@pytest.mark.comfyui
def test_needs_comfyui_dir():
    from conftest import comfyui_dir_or_skip
    comfyui_dir_or_skip()
'''


def _env(ci: str | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "COMFYUI_DIR")}
    if ci is not None:
        env["CI"] = ci
    env.update(extra)
    return env


def _run_with_conftest(tmp_path, ci):
    """The test file above run with this repository's tests/conftest.py loaded as a plugin."""
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    env = _env(ci, PYTHONPATH=str(REPO / "tests"))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "conftest",
                           str(tmp_path / "test_skipping.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_under_ci_a_skipped_comfyui_test_fails(tmp_path):
    r = _run_with_conftest(tmp_path, "true")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "2 failed, 1 skipped" in out, out
    assert "CI=true: a comfyui test may not skip (Skipped: no such ComfyUI feature)" in out
    assert "CI=true: a comfyui test may not skip (Skipped: COMFYUI_DIR not set (real-ComfyUI integration tests); " \
        ".ci/run sets one up" in out


def test_outside_ci_comfyui_tests_skip(tmp_path):
    r = _run_with_conftest(tmp_path, None)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "3 skipped" in out and "COMFYUI_DIR not set (real-ComfyUI integration tests)" in out


# ---------------------------------------------------------------------------------------------------------
# .ci/run on a miniature clone

FAKE_TOOL_OK = '''#!/usr/bin/env bash
# stand-in for comfyui_headless.sh: "sets up" by creating the venv python the tests look for
set -e
[ "$1" = setup ] || exit 2
echo "$2" >> "$(dirname "$0")/setups.log"
mkdir -p "$3/.venv/bin" && ln -sf "$(command -v python3)" "$3/.venv/bin/python"
'''
FAKE_TOOL_FAIL = '#!/usr/bin/env bash\necho "pip: no matching distribution for torch" >&2\nexit 1\n'
PLAIN_TEST = "def test_plain():\n    assert 1 + 1 == 2\n"
COMFY_TEST = '''import os, pytest

@pytest.mark.comfyui
def test_real_comfyui():
    assert os.path.isfile(os.path.join(os.environ["COMFYUI_DIR"], ".venv", "bin", "python"))
'''


def _mini_clone(tmp_path, tool: str, comfy_test: bool = True) -> pathlib.Path:
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", clone / ".ci" / "run")
    shutil.copy(REPO / ".ci" / "timed", clone / ".ci" / "timed")
    (clone / "requirements-dev.txt").write_text("")
    (clone / "pytest.ini").write_text("[pytest]\nmarkers =\n    comfyui: real ComfyUI\n")
    (clone / "tests").mkdir()
    (clone / "tests" / "test_plain.py").write_text(PLAIN_TEST)
    if comfy_test:
        (clone / "tests" / "test_comfy.py").write_text(COMFY_TEST)
    shared = tmp_path / "shared"
    (shared / "comfyui").mkdir(parents=True)
    (shared / "tools").mkdir()
    (shared / "comfyui" / "ComfyUI-0.33.0.tar.gz").write_bytes(b"not really an archive")
    (shared / "tools" / "comfyui_headless.sh").write_text(tool)
    return clone


def _ci_run(clone, tmp_path, ci: str | None):
    env = _env(ci, LENS_COMFYUI_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    return subprocess.run(["bash", str(clone / ".ci" / "run")], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)


def test_ci_run_sets_up_comfyui_and_runs_both_suites(tmp_path):
    clone = _mini_clone(tmp_path, FAKE_TOOL_OK)
    r = _ci_run(clone, tmp_path, "true")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "== plain suite: pytest exit 0" in out
    assert "== comfyui suite (ComfyUI-0.33.0): pytest exit 0" in out
    assert out.count("1 passed") == 2, out
    # under CI the set-up is fresh and removed afterwards
    assert not list(tmp_path.glob("lens-ci-comfyui.*")) and not (tmp_path / "cache").exists()


def test_ci_run_outside_ci_caches_the_setup(tmp_path):
    clone = _mini_clone(tmp_path, FAKE_TOOL_OK)
    for _ in range(2):
        r = _ci_run(clone, tmp_path, None)
        assert r.returncode == 0, r.stdout + r.stderr
    assert "reusing the ComfyUI set up in" in r.stderr
    setups = (tmp_path / "shared" / "tools" / "setups.log").read_text().splitlines()
    assert len(setups) == 1, setups
    assert len(list((tmp_path / "cache").glob("comfyui-*/.lens-ci-ready"))) == 1


def test_ci_run_fails_when_comfyui_cannot_be_set_up(tmp_path):
    clone = _mini_clone(tmp_path, FAKE_TOOL_FAIL)
    r = _ci_run(clone, tmp_path, "true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no matching distribution for torch" in r.stderr
    assert "ComfyUI set-up from" in r.stderr and "failed" in r.stderr
    assert "comfyui suite" not in r.stderr


def test_ci_run_fails_when_no_comfyui_test_is_collected(tmp_path):
    clone = _mini_clone(tmp_path, FAKE_TOOL_OK, comfy_test=False)
    r = _ci_run(clone, tmp_path, "true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pytest collected no tests: failing CI" in r.stderr


def test_ci_run_without_shared_fails(tmp_path):
    clone = _mini_clone(tmp_path, FAKE_TOOL_OK)
    shutil.rmtree(tmp_path / "shared")
    r = _ci_run(clone, tmp_path, "true")
    assert r.returncode == 1 and "expected ../shared beside the clone" in r.stderr, r.stdout + r.stderr


def _timed_cpu(tmp_path, tool) -> float:
    clone = _mini_clone(tmp_path, tool)
    env = _env("true", LENS_COMFYUI_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, str(clone / ".ci" / "timed")], cwd=clone, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("== .ci/run exit 0: wall")]
    assert line, r.stderr
    return float(re.search(r"CPU (\d+) s", line[0]).group(1))


def test_ci_timed_counts_the_cpu_time_of_detached_processes(tmp_path):
    """.ci/timed runs .ci/run and counts the CPU time of detached descendants too (a stand-in for the ComfyUI
    servers the tests start: a process the set-up tool leaves running in the background, 4 s of CPU)."""
    burner = FAKE_TOOL_OK + 'nohup python3 -c "import time\nt = time.process_time()\n' \
        'while time.process_time() - t < 4.0: pass" >/dev/null 2>&1 &\n'
    plain = _timed_cpu(tmp_path / "plain", FAKE_TOOL_OK)
    burning = _timed_cpu(tmp_path / "burning", burner)
    assert burning - plain >= 3, (plain, burning)
