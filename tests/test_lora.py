"""lens_core.lora: every trainer format against a hand-merged model, stacking, removal, 8-bit layers, bad input."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import fixtures as fx
import lora_fixtures as lf
from lens_core import lora as lo
from lens_core.checkpoints import load_transformer
from lens_core.dit import LensTransformer


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def base_model(golden_dir):
    m = LensTransformer(fx.dit_config(golden_dir), dtype=torch.float32).eval()
    m.load_state_dict(fx.dit_state_dict(golden_dir), strict=True)
    return m


@pytest.fixture()
def model(base_model):
    return copy.deepcopy(base_model)


def inputs(cfg, seed=1, grid=(4, 6), text=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, grid[0] * grid[1], cfg.in_channels, generator=g)
    feats = torch.randn(2, text, cfg.num_text_layers * cfg.enc_hidden_dim, generator=g)
    mask = torch.ones(2, text, dtype=torch.bool)
    mask[1, 3:] = False
    return x, feats, mask, torch.tensor([0.7, 0.25]), grid


@torch.no_grad()
def run(m, inp):
    x, feats, mask, t, grid = inp
    return m(x, feats, mask, t, grid=grid)


def hand_merged(base, parts):
    """A copy of ``base`` with W += Σ strength · scale · ΔW (ΔW from lora_fixtures.hand_delta)."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for factors, scale, strength in parts:
            for name, f in factors.items():
                w = m.get_submodule(name).weight
                w.copy_((w.double() + strength * lf.hand_delta(f, scale)).float())
    return m


# (format, factor kind, scale the trainer meant, from the test's own reading of each trainer)
FORMATS = [
    ("kohya", "lora", lambda f: f.alpha / f.rank),
    ("videox", "lora", lambda f: f.alpha / f.rank),
    ("onetrainer", "lora", lambda f: f.alpha / f.rank),
    ("onetrainer-loha", "loha", lambda f: f.alpha / f.rank),
    ("peft", "lora", lambda f: f.alpha / f.rank),
    ("peft-prefixed", "lora", lambda f: f.alpha / f.rank),
    ("diffusion-model", "lora", lambda f: f.alpha / f.rank),
    ("sceneworks-lokr", "lokr", lambda f: f.alpha / f.rank),            # PEFT LoKr: alpha / r always
    ("sceneworks-lokr", "lokr-decomposed", lambda f: f.alpha / f.rank),
    ("lycoris-lokr", "lokr", lambda f: 1.0),                              # LyCORIS: full halves ignore alpha
    ("lycoris-lokr", "lokr-decomposed", lambda f: f.alpha / f.rank),
]


@pytest.mark.parametrize("fmt,kind,scale_of", FORMATS, ids=[f"{a}-{b}" for a, b, _ in FORMATS])
def test_format_equals_hand_merge(fmt, kind, scale_of, base_model, model, tmp_path):
    names = lf.target_names(base_model)           # attention + MLP + modulation of both blocks
    factors = lf.random_factors(base_model, names, kind=kind, rank=4, alpha=3.0, seed=2)
    path = lf.write(tmp_path / f"{fmt}.safetensors", fmt, factors)
    adapter = lo.load_lora(path)
    assert sorted(adapter.targets) == sorted(names)
    scale = scale_of(next(iter(factors.values())))
    strength = 0.8
    lo.apply_lora(model, adapter, strength)
    inp = inputs(base_model.config)
    ref = run(hand_merged(base_model, [(factors, scale, strength)]), inp)
    out = run(model, inp)
    base = run(base_model, inp)
    assert rel(out, base) > 1e-3                  # the adapter really changes the output
    assert rel(out, ref) <= 1e-6


def test_strength_zero_and_removal_are_bit_identical(base_model, model, tmp_path):
    factors = lf.random_factors(base_model, lf.target_names(base_model), seed=3)
    path = lf.write(tmp_path / "a.safetensors", "kohya", factors)
    inp = inputs(base_model.config)
    base = run(base_model, inp)
    lo.apply_lora(model, path, 0.0)
    assert torch.equal(run(model, inp), base)
    lo.apply_lora(model, path, 1.3)
    assert not torch.equal(run(model, inp), base)
    lo.remove_loras(model)
    assert torch.equal(run(model, inp), base)
    for n, p in model.state_dict().items():
        assert torch.equal(p, base_model.state_dict()[n]), n


def test_two_stacked_adapters_equal_hand_merged_sum(base_model, model, tmp_path):
    names = lf.target_names(base_model)
    fa = lf.random_factors(base_model, names, kind="lora", rank=4, alpha=2.0, seed=4)
    fb = lf.random_factors(base_model, names[:7], kind="loha", rank=3, alpha=1.5, seed=5)
    pa = lf.write(tmp_path / "a.safetensors", "peft", fa)
    pb = lf.write(tmp_path / "b.safetensors", "onetrainer-loha", fb)
    lo.apply_lora(model, pa, 0.7)
    lo.apply_lora(model, pb, -1.2)
    inp = inputs(base_model.config)
    ref = run(hand_merged(base_model, [(fa, 2.0 / 4, 0.7), (fb, 1.5 / 3, -1.2)]), inp)
    assert rel(run(model, inp), ref) <= 1e-6
    assert [s for _, s in lo.applied_loras(model)] == [0.7, -1.2]


def test_same_adapter_in_two_formats_gives_identical_outputs(base_model, tmp_path):
    factors = lf.random_factors(base_model, lf.target_names(base_model), rank=4, alpha=4.0, seed=6)
    inp = inputs(base_model.config)
    outs = []
    for fmt in ("kohya", "videox", "onetrainer", "peft", "peft-prefixed"):
        m = copy.deepcopy(base_model)
        lo.apply_lora(m, lf.write(tmp_path / f"{fmt}.safetensors", fmt, factors), 0.9)
        outs.append(run(m, inp))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_alpha_only_in_metadata_and_missing_alpha(base_model, tmp_path):
    factors = lf.random_factors(base_model, lf.target_names(base_model, blocks=[0]), rank=8, alpha=2.0, seed=7)
    # kohya keys without .alpha tensors, alpha in ss_network_alpha metadata
    path = lf.write(tmp_path / "k.safetensors", "peft", factors,
                    metadata={"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 2.0})})
    assert all(abs(t.scale - 0.25) < 1e-12 for t in lo.load_lora(path).targets.values())
    sd = {f"lora_unet_{n.replace('.', '_')}.lora_{r}.weight": f.t["up" if r == "up" else "down"]
          for n, f in factors.items() for r in ("up", "down")}
    save_file(sd, str(tmp_path / "ss.safetensors"), metadata={"ss_network_alpha": "4.0", "ss_network_dim": "8"})
    assert all(abs(t.scale - 0.5) < 1e-12 for t in lo.load_lora(tmp_path / "ss.safetensors").targets.values())
    save_file(sd, str(tmp_path / "none.safetensors"))
    assert all(t.scale == 1.0 for t in lo.load_lora(tmp_path / "none.safetensors").targets.values())
    md = {"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 4.0, "use_rslora": True})}
    path = lf.write(tmp_path / "rs.safetensors", "peft", factors, metadata=md)
    assert all(abs(t.scale - 4.0 / 8 ** 0.5) < 1e-12 for t in lo.load_lora(path).targets.values())


# ---------------------------------------------------------------------------------------------------------
# 8-bit layers: per-call delta


@pytest.fixture(scope="module")
def quantized_models(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_8bit")
    bf16 = fx.write_comfy_dit_bf16(out / "lens_bf16.safetensors", golden_dir)
    mx, _ = fx.write_comfy_dit_mxfp8(out / "lens_mxfp8.safetensors", golden_dir)
    return {"fp8": load_transformer(bf16, dtype=torch.float32, fp8=True),
            "mxfp8": load_transformer(mx, dtype=torch.float32)}


@pytest.mark.parametrize("family,kind", [("fp8", "lora"), ("fp8", "loha"), ("mxfp8", "lora"), ("mxfp8", "lokr")])
def test_per_call_delta_on_8bit_layers(family, kind, quantized_models, base_model, tmp_path):
    q = copy.deepcopy(quantized_models[family])
    names = lf.target_names(base_model)
    per_call = [n for n in names if lo.is_per_call(q.get_submodule(n))]
    # every 8-bit block Linear (fp8: all but img_mod/txt_mod; MXFP8: those with in_features % 32 == 0)
    assert len(per_call) == (20 if family == "fp8" else 16) and not any("_mod" in n for n in per_call)
    factors = lf.random_factors(base_model, names, kind=kind, rank=4, alpha=2.0, seed=8)
    path = lf.write(tmp_path / "a.safetensors", "onetrainer-loha" if kind == "loha" else
                    "sceneworks-lokr" if kind == "lokr" else "kohya", factors)
    inp = inputs(base_model.config)
    base = run(q, inp)
    # reference: a plain fp32 model holding the dequantized weights, hand-merged
    plain = LensTransformer(q.config, dtype=torch.float32).eval()
    sd = {}
    for n, mod in q.named_modules():
        if hasattr(mod, "dequantized_weight"):
            sd[n + ".weight"] = mod.dequantized_weight(torch.float32)
            if mod.bias is not None:
                sd[n + ".bias"] = mod.bias.detach()
    sd.update({k: v for k, v in q.state_dict().items() if k not in sd and not k.endswith("weight_scale")})
    plain.load_state_dict(sd, strict=True)
    assert torch.equal(run(plain, inp), base) or rel(run(plain, inp), base) < 1e-6
    ref = run(hand_merged(plain, [(factors, 0.5, 1.1)]), inp)
    fp8_weight = q.get_submodule(per_call[0]).weight.clone()
    lo.apply_lora(q, path, 1.1)
    assert torch.equal(q.get_submodule(per_call[0]).weight, fp8_weight)    # storage untouched
    assert rel(run(q, inp), ref) <= 1e-6
    lo.remove_loras(q)
    assert torch.equal(run(q, inp), base)


# ---------------------------------------------------------------------------------------------------------
# bad input


def _foreign_keys():
    keys = {
        "SDXL": ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"],
        "FLUX": ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                 "lora_unet_single_blocks_0_linear1.lora_up.weight"],
        "Qwen-Image": ["transformer_blocks.0.img_mod.1.lora_A.weight", "transformer_blocks.0.img_mod.1.lora_B.weight",
                       "transformer_blocks.0.attn.add_q_proj.lora_A.weight",
                       "transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight"],
        "Wan": ["diffusion_model.blocks.0.cross_attn.k.lora_A.weight",
                "diffusion_model.blocks.0.self_attn.q.lora_B.weight"],
    }
    return {fam: {k: torch.zeros(4, 8) for k in ks} for fam, ks in keys.items()}


@pytest.mark.parametrize("family", ["SDXL", "FLUX", "Qwen-Image", "Wan"])
def test_lora_of_another_model_is_named(family, tmp_path):
    p = tmp_path / f"{family}.safetensors"
    save_file(_foreign_keys()[family], str(p))
    with pytest.raises(ValueError, match=family) as e:
        lo.load_lora(p)
    assert str(p) in str(e.value) and "not a LoRA for the Lens DiT" in str(e.value)


def test_qwen_image_lora_sharing_modulation_names_is_named(tmp_path):
    p = tmp_path / "qwen.safetensors"
    save_file({"transformer_blocks.0.img_mod.1.lora_A.weight": torch.zeros(4, 3072),
               "transformer_blocks.0.img_mod.1.lora_B.weight": torch.zeros(18432, 4),
               "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight": torch.zeros(4, 3072)}, str(p))
    with pytest.raises(ValueError, match="Qwen-Image"):
        lo.load_lora(p)


def test_shape_mismatch_names_first_key_and_both_shapes(base_model, model, tmp_path):
    names = lf.target_names(base_model, blocks=[0])
    factors = lf.random_factors(base_model, names, seed=9)
    factors[names[1]].t["down"] = torch.zeros(4, 96)            # attn.txt_qkv expects in = 128
    p = lf.write(tmp_path / "bad.safetensors", "kohya", factors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        lo.apply_lora(model, p, 1.0)
    msg = str(e.value)
    assert "lora_unet_transformer_blocks_0_attn_txt_qkv" in msg and "[384, 96]" in msg and "[384, 128]" in msg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())     # nothing applied


def test_unmatched_keys_warn_once_with_count_and_names(base_model, model, tmp_path):
    factors = lf.random_factors(base_model, lf.target_names(base_model, blocks=[0]), seed=10)
    p = lf.write(tmp_path / "x.safetensors", "kohya", factors)
    from safetensors.torch import load_file
    sd = load_file(str(p))
    sd["lora_unet_some_other_layer.lora_down.weight"] = torch.zeros(2, 3)
    sd["lora_unet_transformer_blocks_0_attn_norm_q.lora_up.weight"] = torch.zeros(2, 3)   # not a Linear
    sd["lora_unet_transformer_blocks_7_attn_img_qkv.lora_down.weight"] = torch.zeros(4, 128)   # no block 7 here
    sd["lora_unet_transformer_blocks_7_attn_img_qkv.lora_up.weight"] = torch.zeros(384, 4)
    save_file(sd, str(p))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        adapter = lo.load_lora(p)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "2 key(s)" in msgs[0] and "lora_unet_some_other_layer" in msgs[0]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lo.apply_lora(model, adapter, 1.0)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "1 LoRA target(s)" in msgs[0] and "transformer_blocks_7" in msgs[0]


def test_pickle_and_non_lora_files_refused(golden_dir, tmp_path):
    p = fx.write_pickle_lookalike(tmp_path / "style.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        lo.load_lora(p)
    pt = tmp_path / "style.pt"
    pt.write_bytes(b"\x80\x04\x95" + bytes(64))
    with pytest.raises(ValueError, match="pickle"):
        lo.load_lora(pt)
    dit = fx.write_comfy_dit_bf16(tmp_path / "lens_bf16.safetensors", golden_dir)
    with pytest.raises(ValueError, match="a Lens DiT.*not a LoRA"):
        lo.load_lora(dit)


def test_nan_and_incomplete_factors_refused(base_model, tmp_path):
    names = lf.target_names(base_model, blocks=[0])[:2]
    factors = lf.random_factors(base_model, names, seed=11)
    factors[names[0]].t["up"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lo.load_lora(lf.write(tmp_path / "nan.safetensors", "kohya", factors))
    save_file({"transformer_blocks.0.attn.img_qkv.lora_A.weight": torch.zeros(4, 128)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        lo.load_lora(tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="strength"):
        lo.apply_lora(copy.deepcopy(base_model), lf.write(tmp_path / "ok.safetensors", "kohya",
                                                          lf.random_factors(base_model, names, seed=1)), float("inf"))


def test_parse_lora_arg():
    assert lo.parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert lo.parse_lora_arg("dir/a.safetensors:0.6") == ("dir/a.safetensors", 0.6)
    assert lo.parse_lora_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert lo.parse_lora_arg("C:\\loras\\a.safetensors:-1") == ("C:\\loras\\a.safetensors", -1.0)
    with pytest.raises(ValueError, match="finite"):
        lo.parse_lora_arg("a.safetensors:nan")


# ---------------------------------------------------------------------------------------------------------
# API + CLI


def test_pipeline_loras_set_loras_and_png_metadata(pipeline_dir, tmp_path):
    from PIL import Image

    from lens_core.__main__ import main
    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")
    dit = pipe.transformer
    factors = lf.random_factors(dit, lf.target_names(dit), rank=4, alpha=4.0, seed=12, scale=0.3)
    pa = lf.write(tmp_path / "style.safetensors", "kohya", factors)
    kw = dict(height=32, width=32, steps=2, cfg=3, seed=1)
    base = pipe("a cube", **kw).uint8
    w_before = {k: v.clone() for k, v in dit.state_dict().items()}
    pipe.set_loras([(pa, 1.0)])
    with_lora = pipe("a cube", **kw)
    assert not torch.equal(with_lora.uint8, base)
    assert with_lora.parameters["loras"] == [{"file": "style.safetensors", "strength": 1.0}]
    pipe.set_loras([])
    assert torch.equal(pipe("a cube", **kw).uint8, base)
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in w_before.items())

    # the CLI goes through from_pretrained(loras=...)
    out = tmp_path / "o.png"
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "a cube", "--height", "32", "--width", "32",
                 "--steps", "2", "--cfg", "3", "--seed", "1", "--device", "cpu", "--dtype", "fp32",
                 "--lora", f"{pa}:1.0", "--out", str(out)]) == 0
    img = Image.open(out)
    assert json.loads(img.text["lens"])["loras"] == [{"file": "style.safetensors", "strength": 1.0}]
    assert "Lora: style.safetensors:1" in img.text["parameters"]
    assert torch.equal(torch.from_numpy(__import__("numpy").asarray(img).copy()), with_lora.uint8[0])
