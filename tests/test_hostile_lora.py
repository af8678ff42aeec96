"""Hostile LoRA input, round 2 (issue 25): non-finite or absurd numbers, metadata that lies, failed applies that
must leave the model exactly as it was, the stacking limit and its linear cost.

Each case ends as a LoraError / ValueError naming the file (or argument), what was found and the fix, before a
weight changes; the model is compared bit for bit with its state before the failed call.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures as fx
import lora_fixtures as lf
from lens_core import lora as lo
from test_cli import gen_args, no_weights, run_cli_error  # noqa: F401  (fixture re-exported)
from test_lora import base_model, model  # noqa: F401  (the tiny golden DiT and a fresh copy per test)


def snapshot(m) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_same(m, snap):
    sd = m.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(sd[k], v), k


def two_targets(model):
    return lf.target_names(model, blocks=[0])[:2]


# ---------------------------------------------------------------------------------------------------------
# numbers that would reach the image as inf/NaN (an all-black PNG)


def test_huge_alpha_tensor_refused_at_load(model, tmp_path):
    f = lf.random_factors(model, two_targets(model), alpha=1e30, seed=1)
    with pytest.raises(lo.LoraError, match=r"alpha_1e30\.safetensors.*scale 2\.5e\+29.*expected at most 1000.*Fix"):
        lo.load_lora(lf.write(tmp_path / "alpha_1e30.safetensors", "kohya", f))


def test_huge_metadata_alpha_refused_at_load(model, tmp_path):
    """``lora_alpha: 1e308`` in PEFT metadata (before: a raw RuntimeError at the merge, adapter left registered)."""
    f = lf.random_factors(model, two_targets(model), seed=2)
    md = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 1e308})}
    with pytest.raises(lo.LoraError, match=r"scale 2\.5e\+307"):
        lo.load_lora(lf.write(tmp_path / "peft.safetensors", "peft", f, metadata=md))


def test_strength_out_of_range_api(model, tmp_path):
    path = lf.write(tmp_path / "ok.safetensors", "kohya", lf.random_factors(model, two_targets(model), seed=3))
    snap = snapshot(model)
    for bad in (1e30, -101.0, float("nan"), float("inf"), True, "x"):
        with pytest.raises(ValueError, match="strength"):
            lo.apply_lora(model, path, bad)
        with pytest.raises(ValueError, match="strength"):
            lo.host_patches(model, lo.load_lora(path), bad)
    assert_same(model, snap) and lo.applied_loras(model) == []
    assert lo.check_strength(-100) == -100.0 and lo.check_strength("0.5") == 0.5


def test_strength_out_of_range_cli(model, pipeline_dir, tmp_path, capsys, no_weights):
    """``--lora FILE:1e30``: refused while the arguments are checked, before any weight is read."""
    path = tmp_path / "ok.safetensors"
    path.write_bytes(b"not read")
    line = run_cli_error(gen_args(pipeline_dir, tmp_path, "--lora", f"{path}:1e30"), capsys)
    assert "strength: expected a value within ±100, got 1e+30" in line and "fix:" in line, line
    assert no_weights == []


def test_huge_finite_factors(model, tmp_path):
    """Factors beyond fp16's range are refused at load; factors inside it whose product pushes the weights
    past ±65504 are refused by the merge check, naming the layer, the strength and the scale."""
    names = two_targets(model)
    f = lf.random_factors(model, names, seed=4)
    f[names[1]].t["up"][0, 0] = 1e30
    with pytest.raises(lo.LoraError, match=r"lora_up.*values up to 1e\+30.*within ±65504"):
        lo.load_lora(lf.write(tmp_path / "f1e30.safetensors", "kohya", f))
    f = lf.random_factors(model, names, seed=4)
    f[names[1]].t["up"].fill_(3e4)
    f[names[1]].t["down"].fill_(3e4)
    adapter = lo.load_lora(lf.write(tmp_path / "big.safetensors", "kohya", f))
    snap = snapshot(model)
    with pytest.raises(lo.LoraError, match=rf"big\.safetensors.*{names[1]}'s weights reach .*at most ±65504.*Fix"):
        lo.apply_lora(model, adapter, 1.0)
    assert_same(model, snap) and lo.applied_loras(model) == []
    # the ComfyUI route (host patches) checks the same
    with pytest.raises(lo.LoraError, match="weights reach"):
        lo.host_patches(model, adapter, 1.0)


# ---------------------------------------------------------------------------------------------------------
# atomic application


def test_failed_apply_leaves_the_model_bit_for_bit(model, tmp_path, monkeypatch):
    names = lf.target_names(model)
    good = lo.load_lora(lf.write(tmp_path / "a.safetensors", "kohya", lf.random_factors(model, names, seed=5)))
    other = lo.load_lora(lf.write(tmp_path / "b.safetensors", "peft",
                                  lf.random_factors(model, names, kind="lora", rank=3, alpha=1.5, seed=6)))
    lo.apply_lora(model, good, 0.8)
    after_a = snapshot(model)
    # a failure half-way through the merge (here the 7th layer; an interrupt or out-of-memory would do the same)
    real, calls = lo._merge_step, []

    def failing(*a, **kw):
        calls.append(a[1])
        if len(calls) == 7:
            raise RuntimeError("simulated failure during the merge")
        return real(*a, **kw)

    monkeypatch.setattr(lo, "_merge_step", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        lo.apply_lora(model, other, -1.1)
    monkeypatch.setattr(lo, "_merge_step", real)
    assert_same(model, after_a)                                   # six merged layers rolled back exactly
    assert [(a.name, s) for a, s in lo.applied_loras(model)] == [("a.safetensors", 0.8)]
    # the model stays usable: the same adapter now applies, and removal gives the originals back
    lo.apply_lora(model, other, -1.1)
    assert len(lo.applied_loras(model)) == 2 and not torch.equal(model.state_dict()[names[0] + ".weight"],
                                                                 after_a[names[0] + ".weight"])
    lo.remove_loras(model)
    base = copy.deepcopy(model)
    lo.apply_lora(base, good, 0.8)
    assert_same(base, after_a)


def test_failed_apply_on_per_call_layers_is_rolled_back(base_model, tmp_path, monkeypatch):
    """8-bit layers get per-call deltas: a failure leaves their delta lists as they were."""
    m = copy.deepcopy(base_model)
    mods = lf.target_names(m, blocks=[0])[:3]
    for name in mods:                       # stand-ins for quantized storage: is_per_call → True
        monkeypatch.setattr(m.get_submodule(name), "dequantized_weight", lambda *a, **k: None, raising=False)
    a = lo.load_lora(lf.write(tmp_path / "a.safetensors", "kohya", lf.random_factors(m, mods, seed=7)))
    lo.apply_lora(m, a, 1.0)
    before = {n: m.get_submodule(n).lens_lora_deltas for n in mods}
    real = lo.LoraDelta
    made = []

    def failing(*args):
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("simulated")
        return real(*args)

    monkeypatch.setattr(lo, "LoraDelta", failing)
    with pytest.raises(RuntimeError):
        lo.apply_lora(m, a, 0.5)
    assert all(m.get_submodule(n).lens_lora_deltas == before[n] for n in mods)
    assert len(lo.applied_loras(m)) == 1


# ---------------------------------------------------------------------------------------------------------
# metadata that lies


def peft_file(model, tmp_path, meta: dict, name="m.safetensors", rank=4, alpha=8.0):
    f = lf.random_factors(model, two_targets(model), rank=rank, alpha=alpha, seed=8)
    return lf.write(tmp_path / name, "peft", f, metadata={"lora_adapter_metadata": json.dumps(meta)})


@pytest.mark.parametrize("value, scale", [(False, 2.0), (True, 4.0), ("false", 2.0), ("False", 2.0),
                                          (" TRUE ", 4.0)])
def test_use_rslora_parsed_strictly(model, tmp_path, value, scale):
    """``use_rslora: "false"`` (a string) was read as true (scale alpha/sqrt(r) = 4 instead of alpha/r = 2)."""
    a = lo.load_lora(peft_file(model, tmp_path, {"r": 4, "lora_alpha": 8, "use_rslora": value}))
    assert {t.scale for t in a.targets.values()} == {scale}


@pytest.mark.parametrize("value", ["no", "0", 1, None, [True]])
def test_use_rslora_that_is_not_a_boolean_is_refused(model, tmp_path, value):
    with pytest.raises(lo.LoraError, match=r"use_rslora = .*expected true or false; fix"):
        lo.load_lora(peft_file(model, tmp_path, {"r": 4, "lora_alpha": 8, "use_rslora": value}))


def test_metadata_rank_disagreeing_with_the_factors_is_an_error(model, tmp_path):
    """metadata r=64 on rank-4 factors: scale 16 (by the factors) or 1 (by the metadata) — refused, naming both."""
    with pytest.raises(lo.LoraError, match=r"metadata r=64 but its factors have rank 4.*64\.0/64 by the metadata or "
                                           r"64\.0/4 by the factors"):
        lo.load_lora(peft_file(model, tmp_path, {"r": 64, "lora_alpha": 64}, alpha=64.0))
    # rank_pattern overrides r for the layers it names (PEFT's per-layer ranks)
    names = two_targets(model)
    ok = peft_file(model, tmp_path, {"r": 64, "lora_alpha": 8, "rank_pattern": {n: 4 for n in names}}, "rp.safetensors")
    assert {t.scale for t in lo.load_lora(ok).targets.values()} == {2.0}
    # SceneWorks/PEFT LoKr: metadata rank vs the decomposed half's rank
    f = lf.random_factors(model, names, kind="lokr-decomposed", rank=4, alpha=4.0, seed=9)
    p = lf.write(tmp_path / "lokr.safetensors", "sceneworks-lokr", f)
    assert lo.load_lora(p)
    save_file(load_file(str(p)), str(tmp_path / "lokr_bad.safetensors"),
              metadata={"networkType": "lokr", "rank": "16", "alpha": "4"})
    with pytest.raises(lo.LoraError, match=r"metadata rank=16 but its factors have rank 4"):
        lo.load_lora(tmp_path / "lokr_bad.safetensors")


@pytest.mark.parametrize("meta, match", [({"r": 4, "lora_alpha": True}, "lora_alpha = True: expected a number"),
                                         ({"r": "four", "lora_alpha": 4}, "r = 'four': expected a number"),
                                         ({"r": 4, "lora_alpha": -2}, "finite positive")])
def test_metadata_numbers_of_the_wrong_type(model, tmp_path, meta, match):
    with pytest.raises(lo.LoraError, match=match):
        lo.load_lora(peft_file(model, tmp_path, meta))


# ---------------------------------------------------------------------------------------------------------
# stacking: a limit, and linear cost


def test_stacking_limit_and_linear_cost(model, tmp_path, monkeypatch):
    names = two_targets(model)
    adapter = lo.load_lora(lf.write(tmp_path / "s.safetensors", "kohya",
                                    lf.random_factors(model, names, seed=10, scale=1e-3)))
    merges = []
    real = lo._merge_step
    monkeypatch.setattr(lo, "_merge_step", lambda *a, **k: merges.append(a[1]) or real(*a, **k))
    for i in range(lo.MAX_STACK):
        lo.apply_lora(model, adapter, 0.01)
        assert len(merges) == (i + 1) * len(names)     # each apply merges only its own adapter
    snap = snapshot(model)
    with pytest.raises(lo.LoraError, match=rf"{lo.MAX_STACK} adapters are already applied.*at most {lo.MAX_STACK} "
                                           rf"stack\. Fix"):
        lo.apply_lora(model, adapter, 0.01)
    assert_same(model, snap) and len(lo.applied_loras(model)) == lo.MAX_STACK
    # the stack equals the hand-merged sum (fp32: one rounding per adapter)
    ref = copy.deepcopy(model)
    lo.remove_loras(ref)
    for name in names:
        w = ref.get_submodule(name).weight
        with torch.no_grad():
            w.copy_(w.double() + lo.MAX_STACK * 0.01 * adapter.targets[name].delta(torch.float64))
        assert torch.allclose(model.get_submodule(name).weight, w, rtol=0, atol=1e-6)
    lo.remove_loras(model)
    assert lo.applied_loras(model) == []
