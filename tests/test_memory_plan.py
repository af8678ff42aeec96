"""Memory plan (issue 25 part 1): stored-dtype weights upcast per layer, sizes from headers, plan choice,
components released and reloaded by the pipeline, ``generate --dry-run``.

The real-size measurement (peak RSS against the plan on a 24 GB machine) is a benchmark, not a test:
``python -m lens_core.bench --component fit`` (BENCHMARKS.md "Memory plan").
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_core import checkpoints as ck
from lens_core import memory as mem
from lens_core.upcast import UpcastLinear


@pytest.fixture(scope="module")
def bf16_dit(golden_dir, tmp_path_factory):
    """The golden tiny DiT's weights rounded to bf16, as a Comfy-style single file, and its config."""
    g = golden_dir / "dit_tiny" / "transformer"
    sd = load_file(str(g / "diffusion_pytorch_model.safetensors"))
    path = tmp_path_factory.mktemp("bf16dit") / "lens_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))
    return path, json.loads((g / "config.json").read_text())


def _params_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


@pytest.mark.parametrize("exact", [True, False])
def test_bf16_stored_dit_upcast_per_layer_is_bit_identical_to_fp32_copy(bf16_dit, exact):
    """fp32 compute on bf16-stored weights == fp32 compute on the fp32 copy of the same bf16 weights, bit for bit,
    at half the weight memory."""
    path, cfg = bf16_dit
    full = ck.load_transformer(path, dtype=torch.float32, config=cfg, storage="compute")
    kept = ck.load_transformer(path, dtype=torch.float32, config=cfg, storage="stored")
    assert kept.dtype == torch.float32
    assert any(isinstance(m, UpcastLinear) for m in kept.modules())
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert _params_bytes(kept) * 2 == _params_bytes(full)
    c = full.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, c.in_channels, generator=gen)
    feats = [torch.randn(2, 7, c.enc_hidden_dim, generator=gen) for _ in range(c.num_text_layers)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        a = full(x, feats, mask, t, (4, 6), exact=exact)
        b = kept(x, feats, mask, t, (4, 6), exact=exact)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)


def test_fp32_files_are_untouched_by_stored_storage(golden_dir):
    """An fp32 checkpoint under fp32 compute: nothing narrower exists, the model is the one loaded before."""
    g = golden_dir / "dit_tiny" / "transformer"
    kept = ck.load_transformer(g, dtype=torch.float32, storage="stored")
    assert not any(isinstance(m, UpcastLinear) for m in kept.modules())
    assert {p.dtype for p in kept.parameters()} == {torch.float32}


def test_text_encoder_bf16_parts_kept_and_features_bit_identical(golden_dir):
    te_dir = golden_dir / "pipeline_tiny" / "text_encoder"
    full = ck.load_text_encoder(te_dir, dtype=torch.float32, storage="compute")
    kept = ck.load_text_encoder(te_dir, dtype=torch.float32, storage="stored")
    assert mem.module_bytes(kept) < 0.6 * mem.module_bytes(full)
    assert kept.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 5000, (2, 30), generator=torch.Generator().manual_seed(1))
    attn = torch.ones(2, 30, dtype=torch.bool)
    attn[0, 25:] = False
    with torch.no_grad():
        a, b = full(ids, attn), kept(ids, attn)
    assert all(x.dtype == torch.float32 and torch.equal(x, y) for x, y in zip(a, b))


def test_meta_build_reads_no_weight_and_sizes_match_the_loaded_models(pipeline_dir, monkeypatch):
    paths = {"transformer": pipeline_dir / "transformer", "text_encoder": pipeline_dir / "text_encoder",
             "vae": pipeline_dir / "vae"}
    for dtype in (torch.float32, torch.bfloat16):
        import lens_core.checkpoints.assign as assign
        import lens_core.checkpoints.safetensors as st

        with monkeypatch.context() as m:      # sizing reads headers only
            m.setattr(st.SafetensorsFile, "read", lambda *a, **k: pytest.fail("a tensor was read"))
            m.setattr(assign, "assign_weights", lambda *a, **k: pytest.fail("weights were assigned"))
            comps, facts = mem.component_sizes(paths, dtype)
        dit = ck.load_transformer(paths["transformer"], dtype=dtype, storage="stored")
        te = ck.load_text_encoder(paths["text_encoder"], dtype=dtype, storage="stored")
        vae = ck.load_vae(paths["vae"], dtype=dtype)
        assert comps["transformer"].resident == mem.module_bytes(dit)
        assert comps["text_encoder"].resident == mem.module_bytes(te)
        assert comps["vae"].resident == mem.module_bytes(vae)
        assert facts["variant"] == dit.lens_checkpoint.variant


def _fake_sizes(monkeypatch, te=12.6e9, dit=8.2e9, vae=0.17e9):
    """plan_memory on real-size figures without real-size files: the component sizes are replaced."""
    from lens_core.config import REAL_DIT_CONFIG
    from lens_core.text_encoder import TextEncoderConfig

    def sizes(paths, dtype, **kw):
        comps = {n: mem.Component(n, f"/m/{n}", int(b), "test", "bf16", 0)
                 for n, b in (("text_encoder", te), ("transformer", dit), ("vae", vae))}
        return comps, {"dit_config": REAL_DIT_CONFIG, "variant": "lens",
                       "te_config": TextEncoderConfig.from_dict(ck.REAL_TE_CONFIG), "te_layers": 24}
    monkeypatch.setattr(mem, "component_sizes", sizes)


@pytest.mark.parametrize("available, mode", [(40e9, "resident"), (22e9, "sequential"), (18e9, "sequential")])
def test_plan_picks_the_first_mode_that_fits(monkeypatch, available, mode):
    _fake_sizes(monkeypatch)
    plan = mem.plan_memory({"vae": "/m/vae"}, torch.bfloat16, "cpu", height=1024, width=1024, cfg=5.0,
                           available=available)
    assert plan.mode == mode and plan.fits
    assert plan.peak_bytes <= mem.HEADROOM * available
    enc = plan.stages[0]
    assert enc.name == "encode" and enc.peak >= mem.PROCESS_BYTES + 12.6e9
    if mode != "resident":
        assert enc.released_after == ("text_encoder",)
        assert all("text_encoder" not in s.held for s in plan.stages[1:])
        assert any("loaded again for each new prompt" in n for n in plan.notes)
    text = plan.describe()
    assert f"memory plan: {mode}" in text and "peak estimate" in text and "then release text encoder" in (
        text if mode != "resident" else "then release text encoder")


def test_minimal_releases_the_dit_before_decoding(monkeypatch):
    _fake_sizes(monkeypatch, te=4e9, dit=8.2e9)
    kw = dict(height=1024, width=1024, cfg=5.0)
    peaks = mem.plan_memory({"vae": "/m/vae"}, torch.bfloat16, "cpu", available=1e12, **kw).alternatives
    assert peaks["minimal"] < peaks["sequential"] < peaks["resident"]
    between = (peaks["minimal"] + peaks["sequential"]) / 2 / mem.HEADROOM
    plan = mem.plan_memory({"vae": "/m/vae"}, torch.bfloat16, "cpu", available=between, **kw)
    assert plan.mode == "minimal" and plan.peak_bytes == peaks["minimal"]
    assert plan.releases == {"encode": ("text_encoder",), "sample": ("transformer",)}


def test_nothing_fits_says_what_would(monkeypatch):
    _fake_sizes(monkeypatch)
    with pytest.raises(mem.MemoryPlanError) as e:
        mem.plan_memory({"vae": "/m/vae"}, torch.float32, "cpu", height=512, width=512, cfg=5.0,
                        available=12e9)
    msg = str(e.value)
    assert "even one model at a time needs" in msg and "available" in msg and "Fix:" in msg
    assert "text encoder alone needs" in msg        # the encoder is what does not fit here
    _fake_sizes(monkeypatch, te=3e9, dit=16.4e9)
    with pytest.raises(mem.MemoryPlanError) as e:
        mem.plan_memory({"vae": "/m/vae"}, torch.float32, "cpu", height=2048, width=2048, cfg=5.0,
                        available=16e9)
    assert "GGUF" in str(e.value) and "smaller image" in str(e.value)
    # an explicit mode is used as asked, flagged as not fitting
    plan = mem.plan_memory({"vae": "/m/vae"}, torch.float32, "cpu", height=512, width=512, cfg=5.0,
                           available=16e9, memory="resident")
    assert plan.mode == "resident" and not plan.fits


def test_sequential_pipeline_same_images_and_releases_the_encoder(pipeline_dir):
    from lens_core.pipeline import LensPipeline

    kw = dict(dtype="fp32", device="cpu")
    ref = LensPipeline.from_pretrained(pipeline_dir, memory="resident", **kw)
    seq = LensPipeline.from_pretrained(pipeline_dir, memory="sequential", **kw)
    assert seq._models == {"transformer": None, "text_encoder": None, "vae": None}   # nothing loaded yet
    args = dict(height=32, width=48, steps=2, cfg=5.0, seed=3)
    a = ref("a red cube", **args)
    b = seq("a red cube", **args)
    assert torch.equal(a.latents, b.latents) and a.images[0].tobytes() == b.images[0].tobytes()
    assert seq._models["text_encoder"] is None and seq._models["transformer"] is not None
    dit = seq._models["transformer"]
    seq("a red cube", **args)                         # same prompt: features reused, encoder not reloaded
    assert seq._models["text_encoder"] is None and seq._models["transformer"] is dit
    c = seq("a blue sphere", **args)                  # new prompt: the encoder is loaded again, then released
    assert torch.equal(c.latents, ref("a blue sphere", **args).latents)
    assert seq._models["text_encoder"] is None
    mini = LensPipeline.from_pretrained(pipeline_dir, memory="minimal", **kw)
    d = mini("a red cube", **args)
    assert torch.equal(d.latents, a.latents) and mini._models["transformer"] is None


def test_auto_memory_on_the_tiny_model_is_resident(pipeline_dir):
    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype="fp32", device="cpu")
    assert pipe.memory == "resident" and pipe.memory_plan.mode == "resident"
    assert pipe._models["transformer"] is not None


def test_dry_run_prints_the_plan_without_reading_weights(pipeline_dir, tmp_path, capsys, monkeypatch):
    import lens_core.checkpoints.assign as assign
    import lens_core.checkpoints.safetensors as st
    from lens_core.__main__ import main

    monkeypatch.setattr(st.SafetensorsFile, "read", lambda *a, **k: pytest.fail("a tensor was read"))
    monkeypatch.setattr(assign, "assign_weights", lambda *a, **k: pytest.fail("weights were assigned"))
    out = tmp_path / "o.png"
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "a cube", "--height", "32", "--width", "48",
                 "--dtype", "fp32", "--out", str(out), "--dry-run", "--plan-json"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    lines = text.strip().splitlines()
    assert lines[0].startswith("memory plan: resident (all models held), compute fp32 on cpu")
    for label in ("text encoder", "DiT", "VAE", "process", "stage encode", "stage sample", "stage decode",
                  "peak estimate"):
        assert any(line.strip().startswith(label) for line in lines), label
    plan = json.loads(lines[-1])
    assert plan["mode"] == "resident" and plan["peak_bytes"] > mem.PROCESS_BYTES
    assert set(plan["components"]) == {"text_encoder", "transformer", "vae"}
    # --memory forces a mode; the dry run shows what is released when
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "a cube", "--height", "32", "--width", "48",
                 "--dtype", "fp32", "--out", str(out), "--dry-run", "--memory", "sequential"]) == 0
    assert "then release text encoder" in capsys.readouterr().out
