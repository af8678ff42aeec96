"""``python -m lens_core batch``: JSONL jobs, one model load, byte-identical to ``generate``, resumable, on Ray.

Everything runs the tiny golden pipeline (fp32, CPU). The reference for every batch output is a separate
``generate`` run of the same job (or the single-process batch run, which is itself checked against them).
The Ray tests share one local 2-CPU cluster (module-scoped fixture, small object store)."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import lora_fixtures as lf
from conftest import REPO, in_ci
from lens_core.__main__ import main
from test_cli import no_weights  # noqa: F401  (fixture: any weight read fails the test)

NAMES = ["small-s1", "small-s2", "tall-s1", "tall-s2", "lora", "inpaint"]


def defaults(pipeline_dir) -> list[str]:
    return ["--model", str(pipeline_dir), "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def inputs(pipeline_dir, tmp_path_factory):
    """Six jobs: two sizes × two seeds, one with a LoRA, one inpainting job."""
    from lens_core import checkpoints as ck

    d = tmp_path_factory.mktemp("batch_inputs")
    dit = ck.load_transformer(str(pipeline_dir / "transformer"), dtype=torch.float32)
    lora = lf.write(d / "style.safetensors", "peft",
                    lf.random_factors(dit, lf.target_names(dit), rank=4, alpha=2.0, seed=1, scale=0.5))
    del dit
    y, x = np.mgrid[0:64, 0:96]
    Image.fromarray(np.stack([x * 2, y * 3, (x + y) % 256], -1).astype(np.uint8)).save(d / "init.png")
    Image.fromarray(((x >= 48) * 255).astype(np.uint8)).save(d / "mask.png")
    jobs = [
        {"name": "small-s1", "prompt": "a red cube", "height": 64, "width": 96, "seed": 1},
        {"name": "small-s2", "prompt": "a red cube", "height": 64, "width": 96, "seed": 2},
        {"name": "tall-s1", "prompt": "a blue ball", "negative": "blurry", "height": 96, "width": 64, "seed": 1},
        {"name": "tall-s2", "prompt": "a blue ball", "height": 96, "width": 64, "seed": 2, "cfg": 3},
        {"name": "lora", "prompt": "a red cube", "height": 64, "width": 96, "seed": 1, "lora": f"{lora}:0.8"},
        {"name": "inpaint", "prompt": "a green frog", "image": str(d / "init.png"), "mask": str(d / "mask.png"),
         "seed": 3},
    ]
    return types.SimpleNamespace(dir=d, lora=lora, jobs=jobs)


def write_jobs(path, jobs) -> str:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs), encoding="utf-8")
    return str(path)


def generate_argv(job) -> list[str]:
    """The ``generate`` options of a job (the reference run)."""
    argv = []
    for k, v in job.items():
        if k != "name":
            argv += [f"--{k}", str(v)]
    return argv


def manifest(out) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(out) / "manifest.jsonl").read_text().splitlines()]


def outputs(out) -> dict:
    return {n: (pathlib.Path(out) / f"{n}.png").read_bytes() for n in NAMES}


@pytest.fixture(scope="module")
def single_run(inputs, pipeline_dir, tmp_path_factory):
    """The single-process batch run of the six jobs (the reference for the later runs)."""
    out = tmp_path_factory.mktemp("batch_single") / "out"
    jobs = write_jobs(out.parent / "jobs.jsonl", inputs.jobs)
    t = time.perf_counter()
    rc = main(["batch", jobs, "--out", str(out), *defaults(pipeline_dir)])
    seconds = time.perf_counter() - t
    assert rc == 0
    return types.SimpleNamespace(out=out, jobs=jobs, seconds=seconds, png=outputs(out))


@pytest.fixture()
def loads(monkeypatch) -> list[dict]:
    """The keyword arguments of every LensPipeline.from_pretrained call (the models really load)."""
    from lens_core.pipeline import LensPipeline

    real = LensPipeline.from_pretrained.__func__
    calls = []

    def recording(cls, *a, **kw):
        calls.append(kw)
        return real(cls, *a, **kw)
    monkeypatch.setattr(LensPipeline, "from_pretrained", classmethod(recording))
    return calls


def test_batch_equals_separate_generate_runs(single_run, inputs, pipeline_dir, tmp_path, capsys):
    """Each of the 6 PNGs is the PNG a separate ``generate`` run writes: the same pixels and metadata, including
    the regenerate command, whose ``--out`` names each file (so only that argument differs); the manifest has one
    ok record per job with the file's sha256."""
    import io
    import shlex

    def content(data: bytes, out: str):
        img = Image.open(io.BytesIO(data))
        meta = json.loads(img.text["lens"])
        argv = shlex.split(meta["command"])
        assert argv[argv.index("--out") + 1] == out
        argv[argv.index("--out") + 1] = "OUT"
        meta["command"] = shlex.join(argv)
        return img.tobytes(), meta, img.text["parameters"]

    for job in inputs.jobs:
        ref = tmp_path / f"{job['name']}.png"
        assert main(["generate", *defaults(pipeline_dir), *generate_argv(job), "--out", str(ref)]) == 0
        # generate stores its --out as given; batch the file name within its output folder
        assert content(ref.read_bytes(), str(ref)) == content(single_run.png[job["name"]],
                                                              f"{job['name']}.png"), job["name"]
    assert len({hashlib.sha256(b).hexdigest() for b in single_run.png.values()}) == 6
    recs = manifest(single_run.out)
    assert [r["name"] for r in recs] == NAMES
    for r, job in zip(recs, inputs.jobs):
        assert r["status"] == "ok" and r["output"] == f"{job['name']}.png" and r["attempts"] == 1
        assert r["sha256"] == hashlib.sha256(single_run.png[job["name"]]).hexdigest()
        assert r["seed"] == job["seed"] and r["timings"]["image_s"] > 0 and ":" in r["worker"]
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert sum("load_s" in r["timings"] for r in recs) == 1               # one model load for all six
    assert "lora_s" in recs[4]["timings"] and "load_s" not in recs[4]["timings"]   # LoRA on the loaded DiT
    meta = json.loads(Image.open(single_run.out / "lora.png").text["lens"])
    assert f"--lora {inputs.lora}:0.8" in meta["command"] and meta["loras"] == [
        {"file": "style.safetensors", "strength": 0.8}]
    assert not [p for p in os.listdir(single_run.out) if p.endswith(".lens-tmp")]


def test_rerun_skips_every_job_without_loading(single_run, pipeline_dir, loads, capsys):
    """The same command again: all six skipped, no model loaded; a damaged output (or one whose job changed)
    runs again and only that one."""
    argv = ["batch", single_run.jobs, "--out", str(single_run.out), *defaults(pipeline_dir)]
    before = (single_run.out / "manifest.jsonl").read_text()
    t = time.perf_counter()
    assert main(argv) == 0
    seconds = time.perf_counter() - t
    err = capsys.readouterr().err
    assert "6 job(s): 0 done, 6 skipped, 0 failed" in err and "0 model load(s)" in err, err
    assert loads == []
    assert (single_run.out / "manifest.jsonl").read_text() == before
    with capsys.disabled():       # the figure for BENCHMARKS.md (no timed assertion)
        print(f"\nfirst run {single_run.seconds:.2f} s, re-run {seconds:.3f} s ({seconds / single_run.seconds:.1%})")
    # a damaged file is made again (the same bytes), the other five stay skipped
    (single_run.out / "tall-s2.png").write_bytes(b"\x89PNG damaged")
    assert main(argv) == 0
    assert "1 done, 5 skipped" in capsys.readouterr().err and len(loads) == 1
    assert outputs(single_run.out) == single_run.png


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "height": 64, "width": 96', "JOBS line 3: invalid JSON"),
    ('["a list"]', "JOBS line 3: expected a JSON object"),
    ('{"prompt": "x", "heigth": 64}', "JOBS line 3: unknown key 'heigth' (did you mean 'height'?)"),
    ('{"prompt": "x", "height": "tall", "width": 64}', "JOBS line 3: argument --height: invalid int value: 'tall'"),
    ('{"prompt": "x", "height": 40, "width": 64}', "JOBS line 3: --height must be a positive multiple of 16"),
    ('{"prompt": "x", "cfg": NaN}', "JOBS line 3: NaN is not a number JSON allows"),
    ('{"prompt": "x", "seed": 1, "seed": 2}', "JOBS line 3: the key 'seed' appears twice"),
    ('{"negative": "x"}', "JOBS line 3: one of the arguments --prompt --prompt-file is required"),
    ('{"prompt": "x", "variant": "turbo2"}', "JOBS line 3: argument --variant: invalid choice: 'turbo2'"),
    ('{"prompt": "x", "num-images": 4}', "JOBS line 3: 'num-images' is not a job key: one job is one image"),
    ('{"prompt": "x", "overwrite": true}', "JOBS line 3: 'overwrite' is not a job key: --overwrite is an option"),
    ('{"prompt": "x", "name": "../escape"}', "JOBS line 3: name '../escape': expected a plain file name"),
    ('{"prompt": "x", "name": "a"}', "JOBS line 3: output a.png is already the name of line 1"),
    ('{"prompt": "x", "lora": "/nonexistent/style.safetensors"}', "JOBS line 3: --lora: no such file"),
    ('{"prompt": "x", "enhance": "yes"}', "JOBS line 3: enhance: expected true or false"),
    ('{"prompt": "x", "dry-run": true}', "JOBS line 3: 'dry-run' is not a job key: batch has no dry run"),
    ('{"prompt": "x", "memory": "tiny"}', "JOBS line 3: argument --memory: invalid choice: 'tiny'"),
])
def test_bad_job_line_named_before_loading(pipeline_dir, tmp_path, capsys, no_weights, line, message):  # noqa: F811
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "ok", "name": "a"}\n\n' + line + "\n" + '{"prompt": "ok"}\n')
    rc = main(["batch", str(jobs), "--out", str(tmp_path / "out"), *defaults(pipeline_dir)])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert no_weights == [] and not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.mark.parametrize("flags", [["--dry-run"], ["--dry-run", "--plan-json"], ["--plan-json"]])
def test_dry_run_refused_before_anything(pipeline_dir, tmp_path, capsys, no_weights, flags):  # noqa: F811
    """generate's --dry-run / --plan-json are not batch options: refused with the fix, nothing read or written
    (they used to be accepted as job defaults and ignored: the whole batch ran)."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "x", "height": 64, "width": 64}])
    rc = main(["batch", jobs, "--out", str(tmp_path / "out"), *flags, *defaults(pipeline_dir)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: {flags[0]}: not an option of batch" in err and "fix: drop it" in err, err
    assert no_weights == [] and not (tmp_path / "out").exists()


def test_memory_option_reaches_the_loaded_pipeline(single_run, inputs, pipeline_dir, tmp_path, loads):
    """--memory minimal as a batch default (and a job's own "memory") is the pipeline's memory plan: jobs with
    different plans are different configurations (two loads), the PNG records the plan, and the pixels equal the
    single-process run's (a memory plan changes when models are held, not the numbers)."""
    job = next(j for j in inputs.jobs if j["name"] == "small-s1")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job, dict(job, name="resident", memory="resident")])
    out = tmp_path / "out"
    assert main(["batch", jobs, "--out", str(out), "--memory", "minimal", *defaults(pipeline_dir)]) == 0
    assert [kw.get("memory") for kw in loads] == ["minimal", "resident"]
    ref = Image.open(single_run.out / "small-s1.png")
    for name, memory in (("small-s1", "minimal"), ("resident", "resident")):
        img = Image.open(out / f"{name}.png")
        assert json.loads(img.text["lens"])["memory"] == memory
        assert img.tobytes() == ref.tobytes()


def test_bad_lora_and_misplaced_model_found_before_loading(single_run, inputs, pipeline_dir, tmp_path, loads,
                                                            capsys):
    """generate's header checks run once per (configuration, LoRA set) before any load: a FLUX LoRA and a DiT
    given as the VAE stop the run naming the first JOBS line that uses them (nothing loaded, nothing written);
    with --skip-invalid every job of those sets is recorded invalid and the good job runs (= the reference)."""
    from safetensors.torch import save_file

    flux = tmp_path / "flux_lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}, str(flux))
    good = next(j for j in inputs.jobs if j["name"] == "small-s1")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        good, dict(good, name="flux-1", lora=str(flux)), dict(good, name="flux-2", seed=5, lora=str(flux)),
        dict(good, name="bad-vae", vae=str(pipeline_dir / "transformer"))])
    out = tmp_path / "out"
    rc = main(["batch", jobs, "--out", str(out), *defaults(pipeline_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "error: JOBS line 2: " in err and "FLUX" in err and str(flux) in err, err
    assert loads == [] and not (out / "manifest.jsonl").exists()
    rc = main(["batch", jobs, "--out", str(out), "--skip-invalid", *defaults(pipeline_dir)])
    err = capsys.readouterr().err
    assert rc == 103 and "1 done, 0 skipped, 0 failed, 3 invalid" in err, err
    recs = {r.get("name", r["line"]): r for r in manifest(out)}
    assert [recs[k]["status"] for k in ("small-s1", 2, 3, 4)] == ["ok", "invalid", "invalid", "invalid"]
    assert recs[3]["error"].startswith("JOBS line 3: ") and "LoRAs of JOBS line 2" in recs[3]["error"]
    assert "this looks like a Lens DiT" in recs[4]["error"] and "LoRAs of JOBS" not in recs[4]["error"], recs[4]
    assert len(loads) == 1 and (out / "small-s1.png").read_bytes() == single_run.png["small-s1"]


def test_cli_defaults_and_job_keys_merge(pipeline_dir, tmp_path, no_weights):  # noqa: F811
    """A job's own size or prompt replaces the command line's; paths become absolute; prompt files are read."""
    from lens_core import batch

    (tmp_path / "p.txt").write_text("from a file\n")
    args = types.SimpleNamespace(aspect="16:9", prompt="default prompt", seed=4, lora=[], model=str(pipeline_dir),
                                 out=str(tmp_path), dtype="fp32", device="cpu")
    jl = batch.JobList(args, str(tmp_path), threads=1, remote=False)
    jl.add(1, '{"height": 64, "width": 96, "prompt-file": "%s"}' % (tmp_path / "p.txt"))
    jl.add(2, '{"seed": 9, "name": "b.png"}')
    a, b = jl.jobs
    assert (a.args["height"], a.args["aspect"], a.args["prompt"], a.args["seed"]) == (64, None, "from a file", 4)
    assert (b.args["aspect"], b.args["prompt"], b.args["seed"], b.name) == ("16:9", "default prompt", 9, "b")
    assert a.config == b.config and a.key != b.key and a.name.startswith("job-")
    assert a.args["out"] == os.path.join(str(tmp_path), a.name + ".png")


def test_queue_groups_by_configuration_then_lora_set():
    """A worker takes the jobs of what it holds first: configurations A, B and LoRA sets x, y interleaved in
    JOBS → A/x, A/x, A/y, then B; a second worker starting fresh takes the next group in JOBS order."""
    from lens_core.batch import Job, JobQueue

    spec = [("A", "x"), ("B", "x"), ("A", "y"), ("A", "x"), ("B", "y"), ("A", "y")]
    q = JobQueue([Job(i + 1, f"j{i + 1}", {}, config=c, loras=l) for i, (c, l) in enumerate(spec)])
    first = q.take()
    order = [first.line]
    held = (first.config, first.loras)
    while len(q):
        j = q.take(held)
        held = (j.config, j.loras)
        order.append(j.line)
    assert order == [1, 4, 3, 6, 2, 5]
    q = JobQueue([Job(i + 1, f"j{i + 1}", {}, config=c, loras=l) for i, (c, l) in enumerate(spec)])
    assert [q.take(("A", "x")).line, q.take().line, q.take(("B", "y")).line] == [1, 4, 5]
    q.put_back(Job(9, "j9", {}, config="A", loras="x"))
    assert q.take(("A", "x")).line == 9


def test_failures_and_invalid_lines_recorded_rest_go_on(single_run, inputs, pipeline_dir, tmp_path, monkeypatch,
                                                         capsys):
    """--skip-invalid: a bad line is recorded, a job failing at run time is recorded, the others run (in
    reverse order here: the same bytes, whatever the order); exit status 100 + failures."""
    from lens_core import __main__ as cli

    real = cli.render_image

    def failing(pipe, args, plan, k=0, **kw):
        if args.prompt == "boom":
            raise RuntimeError("the sampler exploded")
        return real(pipe, args, plan, k, **kw)
    monkeypatch.setattr(cli, "render_image", failing)
    lines = [json.dumps(j) for j in reversed(inputs.jobs)]
    lines.insert(2, '{"prompt": "x", "steps": 0}')
    lines.insert(4, '{"prompt": "boom", "name": "boom", "height": 32, "width": 32}')
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "small-s1.png").write_bytes(b"someone else's picture")     # not written by a batch run: kept
    rc = main(["batch", str(jobs), "--out", str(out), "--skip-invalid", *defaults(pipeline_dir)])
    err = capsys.readouterr().err
    assert rc == 103, err
    assert "5 done, 0 skipped, 2 failed, 1 invalid" in err
    recs = {r.get("name", r["line"]): r for r in manifest(out)}
    assert recs[3]["status"] == "invalid" and "JOBS line 3: --steps: expected an integer in [1, 1000]" in \
        recs[3]["error"]
    assert recs["boom"]["status"] == "failed" and "the sampler exploded" in recs["boom"]["error"]
    assert recs["small-s1"]["status"] == "failed" and "no batch run into this folder wrote it" in \
        recs["small-s1"]["error"] and "--overwrite" in recs["small-s1"]["error"]
    assert (out / "small-s1.png").read_bytes() == b"someone else's picture"
    assert not (out / "boom.png").exists()
    # a re-run with --overwrite retries only the two failed jobs (the sampler now fixed)
    monkeypatch.setattr(cli, "render_image", real)
    assert main(["batch", str(jobs), "--out", str(out), "--skip-invalid", "--overwrite",
                 *defaults(pipeline_dir)]) == 101
    assert "2 done, 5 skipped, 0 failed, 1 invalid" in capsys.readouterr().err
    assert outputs(out) == single_run.png


def test_failed_lora_switch_is_not_taken_for_the_old_set(single_run, inputs, pipeline_dir, tmp_path, monkeypatch):
    """One worker: the LoRA job, then a job whose LoRA switch fails (the DiT is left without LoRAs), then the
    LoRA job's set again: it is applied again, the PNG equals the single-process run's "lora" output."""
    from lens_core import batch
    from lens_core import lora as lo

    args = types.SimpleNamespace(model=str(pipeline_dir), steps=2, dtype="fp32", device="cpu", lora=[])
    jl = batch.JobList(args, str(tmp_path), threads=torch.get_num_threads(), remote=False)
    job = next(j for j in inputs.jobs if j["name"] == "lora")
    jl.add(1, json.dumps(job))
    jl.add(2, json.dumps(dict(job, name="other", lora=f"{inputs.lora}:0.3")))
    worker = batch.Worker()
    first, other = jl.jobs
    assert worker.run_safe(first, str(tmp_path))["status"] == "ok"
    real, calls = lo.apply_lora, []

    def failing_once(model, adapter, strength=1.0):
        calls.append(strength)
        if len(calls) == 1:
            raise RuntimeError("LoRA switch failed (test)")
        return real(model, adapter, strength)
    monkeypatch.setattr(lo, "apply_lora", failing_once)
    res = worker.run_safe(other, str(tmp_path))
    assert res["status"] == "failed" and "LoRA switch failed" in res["error"] and worker.pipe.loras == []
    (tmp_path / "lora.png").unlink()
    first.replace = True
    res = worker.run_safe(first, str(tmp_path))
    assert res["status"] == "ok" and calls == [0.3, 0.8] and worker.loads == 1
    assert (tmp_path / "lora.png").read_bytes() == single_run.png["lora"]


def test_ctrl_c_finishes_the_current_image_then_resumes(inputs, single_run, pipeline_dir, tmp_path, monkeypatch,
                                                        capsys):
    """First Ctrl-C during image 2: image 2 is finished and written, the run stops (exit 130), the manifest is
    compacted, no temporary file is left. Ctrl-C twice during the next run: that image is abandoned (no file,
    no record). A third run completes the rest; every output equals the uninterrupted run's."""
    from lens_core import __main__ as cli

    real = cli.render_image
    presses = {"n": 0, "at": None}

    def interrupting(pipe, args, plan, k=0, **kw):
        calls["n"] += 1
        if calls["n"] == presses["at"]:
            for _ in range(presses["n"]):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        return real(pipe, args, plan, k, **kw)
    monkeypatch.setattr(cli, "render_image", interrupting)
    argv = ["batch", single_run.jobs, "--out", str(tmp_path / "out"), *defaults(pipeline_dir)]

    calls = {"n": 0}
    presses.update(n=1, at=2)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Ctrl-C: finishing the image in progress" in err and "4 job(s) not run" in err
    assert [r["name"] for r in manifest(tmp_path / "out")] == NAMES[:2]
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".png")) == ["small-s1.png", "small-s2.png"]

    calls = {"n": 0}
    presses.update(n=2, at=1)
    assert main(argv) == 130
    assert [r["name"] for r in manifest(tmp_path / "out")] == NAMES[:2]
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".lens-tmp") or p.startswith("tall")]

    presses.update(at=None)
    assert main(argv) == 0
    assert "4 done, 2 skipped" in capsys.readouterr().err
    assert outputs(tmp_path / "out") == single_run.png


def test_nodes_never_import_batch_or_ray():
    """The ComfyUI layer imports neither the batch runner nor Ray (Ray is an optional extra of the CLI)."""
    files = [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py"))]
    assert len(files) > 3
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            for n in names:
                assert n.split(".")[0] != "ray" and "batch" not in n.split("."), (f, n)


def test_ray_missing_says_how_to_install(pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "x"}])
    rc = main(["batch", jobs, "--out", str(tmp_path / "out"), "--ray", *defaults(pipeline_dir)])
    err = capsys.readouterr().err
    assert rc == 3 and "error: --ray: Ray is not installed" in err
    assert "pip install -r requirements-ray.txt" in err and "lens-nodes[ray]" in err


# ---- Ray: one local 2-CPU cluster for the module -----------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray
    except ImportError:
        if in_ci():
            pytest.fail("ray is not installed (requirements-dev.txt pins it); CI=true: the Ray tests must run")
        pytest.skip("ray not installed (pip install -r requirements-ray.txt)")
    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    yield ray
    ray.shutdown()


def test_ray_two_workers_equal_the_single_process_run(ray_cluster, single_run, pipeline_dir, tmp_path, capsys):
    """Two 1-CPU workers on the local cluster write the six PNGs into the shared --out: byte-identical to the
    single-process run (and so to separate generate runs); both workers took part."""
    out = tmp_path / "out"
    rc = main(["batch", single_run.jobs, "--out", str(out), "--ray", "auto", "--cpus-per-worker", "1",
               *defaults(pipeline_dir)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "ray: 2 worker(s)" in err and "6 done" in err
    assert outputs(out) == single_run.png
    recs = manifest(out)
    assert [r["name"] for r in recs] == NAMES and all(r["status"] == "ok" for r in recs)
    assert len({r["worker"] for r in recs}) == 2


def test_ray_killed_worker_job_retried_and_recorded_once(ray_cluster, single_run, pipeline_dir, tmp_path, capsys):
    """--gather: kill one worker process (SIGKILL) right after its first image; the job it was running goes to
    another worker; the manifest lists every job exactly once, all ok, the PNGs equal the single-process run."""
    out = tmp_path / "out"
    killed = {}

    def killer():
        path = out / "manifest.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    host, pid = rec["worker"].rsplit(":", 1)
                    os.kill(int(pid), signal.SIGKILL)
                    killed["pid"] = rec["worker"]
                    break
            time.sleep(0.005)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rc = main(["batch", single_run.jobs, "--out", str(out), "--ray", "auto", "--cpus-per-worker", "1", "--gather",
               *defaults(pipeline_dir)])
    t.join(5)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert killed and "lost while running JOBS line" in err, err
    recs = manifest(out)
    assert sorted(r["name"] for r in recs) == sorted(NAMES) and all(r["status"] == "ok" for r in recs)
    assert max(r["attempts"] for r in recs) == 2
    retried = [r for r in recs if r["attempts"] == 2]
    assert all(r["worker"] != killed["pid"] for r in retried)
    assert outputs(out) == single_run.png
