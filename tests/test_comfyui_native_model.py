"""The pack's Lens DiT as a native ComfyUI MODEL (issue 24), inside a real ComfyUI (marked ``comfyui``; needs
COMFYUI_DIR). One in-process script runs in the ComfyUI checkout's Python (../shared/tools/comfyui_headless.sh)
on the tiny golden pipeline DiT loaded by LensModelLoader (fp32):

- what the MODEL is (a ModelPatcher over a comfy.model_base.BaseModel subclass, FLUX.2 latent format, flow
  sampling with the official shift, the official CFG as sampler_cfg_function);
- native SamplerCustomAdvanced (CFGGuider, KSamplerSelect euler) with LensSigmas + LensNoise against the official
  pipeline's fp32 final latents of golden cases a (4 steps, CFG 1) and b (6 steps, CFG 5, empty negative), with
  and without CFGNorm(pre_cfg);
- native KSampler (euler / simple) against the official sampler started from KSampler's own noise, at the tiny
  golden size and at 1440² (the size whose official schedule the MODEL's shift encodes);
- native EasyCache: DiT forwards counted (a hook on img_in, which runs once per forward), error vs uncached;
- a native ``dit`` double_block replace patch called for every block of every forward, output unchanged; a
  double_block / post_input patch; LensSampler routing a patched MODEL through ComfyUI's sampling;
- LoRA (LensLoraLoader) through the native graph = LensSampler's numbers; ComfyUI's lowvram partial load keeps the
  numbers bit for bit.
"""
from __future__ import annotations

import json

import pytest

from comfyui_run import run_script
from conftest import comfyui_dir_or_skip

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
import time
import comfy.sample, comfy.samplers
import nodes as core
from comfy_extras import nodes_custom_sampler as ncs, nodes_easycache as nec, nodes_cfg
from safetensors.torch import load_file
NM = sys.modules["lens_nodes_test.nodes.bridge"]
from lens_nodes_test.lens_core import sampling as S, config as C
import comfyui_version
res = {"version": comfyui_version.__version__, "seconds": {}}
_t = [time.time()]
def lap(name):
    res["seconds"][name] = round(time.time() - _t[0], 1)
    _t[0] = time.time()

def call(cls, **kw):
    """A node of either API (classic FUNCTION or the comfy_api io schema of newer nodes)."""
    if hasattr(cls, "define_schema"):
        r = cls.execute(**kw)
        return r.result if hasattr(r, "result") else r
    return getattr(cls(), cls.FUNCTION)(**kw)

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

def max_abs(a, b):
    return float((a.double() - b.double()).abs().max())

def unpack(t, h=4, w=6):              # packed tokens [1, h·w, 128] -> LATENT samples [1, 128, h, w]
    return C.unpack_latents(t, h, w)

for sub in ("diffusion_models", "loras"):         # loras/a.safetensors: written by the test (kohya keys)
    os.makedirs(f"{tmp}/{sub}", exist_ok=True)
    folder_paths.add_model_folder_path(sub, f"{tmp}/{sub}", is_default=True)
os.symlink(golden + "/pipeline_tiny/transformer", f"{tmp}/diffusion_models/tiny")

(model,) = N["LensModelLoader"]().load("tiny", "fp32", "lens")
inner = model.model
dit = inner.diffusion_model
res["kind"] = {"patcher": type(model).__name__, "model": type(inner).__name__,
               "base_model": isinstance(inner, comfy.model_base.BaseModel),
               "dit": [c.__name__ for c in type(dit).__mro__[:2]],
               "latent_format": type(inner.latent_format).__name__,
               "latent_channels": inner.latent_format.latent_channels,
               "downscale": inner.latent_format.spacial_downscale_ratio,
               "sampling": [c.__name__ for c in type(inner.model_sampling).__mro__],
               "shift": float(inner.model_sampling.shift), "official_shift": S.empirical_mu(8100, 20),
               "cfg_official": model.model_options.get("sampler_cfg_function") is NM.official_cfg,
               "dtype": str(inner.manual_cast_dtype or inner.get_dtype()),   # what apply_model casts x to
               "keys": sorted(k for k in inner.state_dict() if k.startswith("diffusion_model.img_in."))}

# ComfyUI's own previewer for the MODEL's latent format (what KSampler shows per step): Flux2's 2x2 reshape
# (0.33) or the bundled 128-channel factors (0.3.64)
import latent_preview
comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
previewer = latent_preview.get_previewer(model.load_device, inner.latent_format)
x0 = torch.randn(1, 128, 4, 6)
shot = previewer.decode_latent_to_preview_image("JPEG", x0)
res["preview_size"] = list(shot[1].size)
lens_shot = NM.get_previewer(model.load_device).decode_latent_to_preview_image("JPEG", x0)   # LensSampler's
res["lens_preview_same"] = lens_shot[1].size == shot[1].size and lens_shot[1].tobytes() == shot[1].tobytes()
comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.NoPreviews

forwards = []                          # one entry (rows) per DiT forward
dit.img_in.register_forward_hook(lambda m, a, o: forwards.append(o.shape[0]))

sampler = call(ncs.KSamplerSelect, sampler_name="euler")[0]
neg = [[torch.zeros(1, 0, 256), {"attention_mask": torch.zeros(1, 0, dtype=torch.long), "num_layers_stacked": 4}]]
lat = {"samples": torch.zeros(1, 128, 4, 6)}

def conds(d):
    feats = torch.cat([d[f"prompt_embeds_{i}"] for i in range(4)], -1)
    return [[feats, {"attention_mask": d["prompt_mask"].long(), "num_layers_stacked": 4}]]

def graph(m, pos, cfg, sigmas, noise, latent=lat):
    guider = call(ncs.CFGGuider, model=m, positive=pos, negative=neg, cfg=cfg)[0]
    return call(ncs.SamplerCustomAdvanced, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                latent_image=latent)[0]["samples"]

has_pre_cfg = "pre_cfg" in str(nodes_cfg.CFGNorm.define_schema()) if hasattr(nodes_cfg, "CFGNorm") else False
cases = {"a_cfg1_4steps": (4, 1.0), "b_cfg5_6steps_emptyneg": (6, 5.0)}
res["cases"] = {}
base_graph = {}
for name, (steps, cfg) in cases.items():
    r = res["cases"][name] = {}
    d = load_file(f"{golden}/pipeline_tiny/cases/{name}.fp32.safetensors")
    ref, pos = unpack(d["final_latents"]), conds(d)
    sig = N["LensSigmas"]().get_sigmas(96, 64, steps, 1.0, "lens")[0]
    (noise,) = N["LensNoise"]().get_noise(1234)
    forwards.clear()
    g = base_graph[name] = graph(model, pos, cfg, sig, noise)
    r["graph_forwards"] = len(forwards)
    r["graph_rel"], r["graph_max_abs"] = rel(g, ref), max_abs(g, ref)
    if has_pre_cfg:
        pre = call(nodes_cfg.CFGNorm, model=model, strength=1.0, pre_cfg=True)[0]
        r["cfgnorm_rel"] = rel(graph(pre, pos, cfg, sig, noise), ref)
    s = N["LensSampler"]().sample(model, pos, neg, lat, 1234, steps, cfg, 1.0)[0]["samples"]
    r["sampler_rel"], r["sampler_max_abs"] = rel(s, ref), max_abs(s, ref)
    r["graph_vs_sampler"] = rel(g, s)

lap("golden_cases")
# KSampler (euler / simple) vs the official sampler from KSampler's own noise
def official(pos, h, w, steps, cfg, noise):
    feats = [t for t in pos[0][0].chunk(4, dim=-1)]
    mask = pos[0][1]["attention_mask"].bool()
    with torch.no_grad():
        out = S.sample(dit.velocity, C.pack_latents(noise), feats, mask, None, None, grid=(h, w), steps=steps,
                       cfg=cfg, exact=True, dtype=torch.float32, device="cpu")
    return C.unpack_latents(out, h, w)

res["ksampler"] = {}
d = load_file(f"{golden}/pipeline_tiny/cases/b_cfg5_6steps_emptyneg.fp32.safetensors")
pos_b = conds(d)
for label, (h, w, steps, cfg) in {"64x96_6steps_cfg5": (4, 6, 6, 5.0), "64x96_4steps_cfg1": (4, 6, 4, 1.0),
                                  "1440x1440_4steps_cfg5": (90, 90, 4, 5.0)}.items():
    latent = N["LensEmptyLatent"]().generate("custom", 1024, 16 * w, 16 * h, 1)[0]
    forwards.clear()
    k = core.KSampler().sample(model, 7, steps, cfg, "euler", "simple", pos_b, neg, latent, 1.0)[0]["samples"]
    kf = len(forwards)
    ref = official(pos_b, h, w, steps, cfg, comfy.sample.prepare_noise(latent["samples"], 7))
    ks = comfy.samplers.calculate_sigmas(inner.model_sampling, "simple", steps)
    res["ksampler"][label] = {"rel": rel(k, ref), "max_abs": max_abs(k, ref), "forwards": kf,
                              "sigma_max_diff": float((ks.cpu() - S.sigma_schedule(steps, h * w)).abs().max())}

lap("ksampler")
# EasyCache: forwards and error vs the uncached run (LensSigmas, LensNoise, CFG 5, 20 steps, 256² = 16x16 grid);
# on ComfyUI 0.33 also on native Lens loaded from the same weights (UNETLoader), with CFGNorm(pre_cfg)
lat16 = N["LensEmptyLatent"]().generate("custom", 1024, 256, 256, 1)[0]
sig20 = N["LensSigmas"]().get_sigmas(256, 256, 20, 1.0, "lens")[0]
(noise,) = N["LensNoise"]().get_noise(5)
THRESHOLD = 0.5
def cached_run(m, count):
    c = call(nec.EasyCacheNode, model=m, reuse_threshold=THRESHOLD, start_percent=0.15, end_percent=0.95,
             verbose=False)[0]
    count.clear()
    out = graph(c, pos_b, 5.0, sig20, noise, lat16)
    return c, out, len(count)
forwards.clear()
full = graph(model, pos_b, 5.0, sig20, noise, lat16)
e = res["easycache"] = {"steps": 20, "threshold": THRESHOLD, "uncached_forwards": len(forwards)}
cached_model, cached, e["forwards"] = cached_run(model, forwards)
e["rel_vs_uncached"] = rel(cached, full)
forwards.clear()
via = N["LensSampler"]().sample(cached_model, pos_b, neg, lat16, 5, 20, 5.0, 1.0)[0]["samples"]
e["lens_sampler_forwards"], e["lens_sampler_vs_graph"] = len(forwards), rel(via, cached)
e["lens_sampler_routes"] = NM.pack_model_patches(cached_model)
if hasattr(comfy.model_base, "Lens"):
    os.symlink(golden + "/pipeline_tiny/transformer/diffusion_pytorch_model.safetensors",
               f"{tmp}/diffusion_models/lens_tiny_fp32.safetensors")
    (native,) = core.UNETLoader().load_unet("lens_tiny_fp32.safetensors", "default")
    native_fw = []
    native.model.diffusion_model.img_in.register_forward_hook(lambda m, a, o: native_fw.append(o.shape[0]))
    native = call(nodes_cfg.CFGNorm, model=native, strength=1.0, pre_cfg=True)[0]
    native_fw.clear()
    native_full = graph(native, pos_b, 5.0, sig20, noise, lat16)
    n_full = len(native_fw)
    _, native_cached, n_fw = cached_run(native, native_fw)
    e["native_lens"] = {"uncached_forwards": n_full, "forwards": n_fw,
                        "rel_vs_uncached": rel(native_cached, native_full),
                        "uncached_vs_ours": rel(native_full, full), "cached_vs_ours": rel(native_cached, cached)}

lap("easycache")
# native block patches
n_blocks = len(dit.transformer_blocks)
calls = []
def replace(args, extra):
    calls.append(args["transformer_options"]["block_index"])
    return extra["original_block"](args)
patched = model.clone()
for i in range(n_blocks):
    patched.set_model_patch_replace(replace, "dit", "double_block", i)
d = load_file(f"{golden}/pipeline_tiny/cases/b_cfg5_6steps_emptyneg.fp32.safetensors")
sig6 = N["LensSigmas"]().get_sigmas(96, 64, 6, 1.0, "lens")[0]
(noise,) = N["LensNoise"]().get_noise(1234)
forwards.clear()
out = graph(patched, pos_b, 5.0, sig6, noise)
res["replace"] = {"blocks": n_blocks, "forwards": len(forwards), "calls": calls[:],
                  "equal_unpatched": bool(torch.equal(out, base_graph["b_cfg5_6steps_emptyneg"]))}
calls.clear()
via = N["LensSampler"]().sample(patched, pos_b, neg, lat, 1234, 6, 5.0, 1.0)[0]["samples"]
res["replace"]["lens_sampler_calls"] = len(calls)
res["replace"]["lens_sampler_equal_graph"] = bool(torch.equal(via, out))
seen = {"double_block": [], "post_input": 0}
def after(args):
    seen["double_block"].append(args["block_index"])
    return {"img": args["img"], "txt": args["txt"]}
def post(args):
    seen["post_input"] += 1
    return {"img": args["img"], "txt": args["txt"]}
p2 = model.clone()
p2.set_model_patch(after, "double_block")
p2.set_model_patch(post, "post_input")
forwards.clear()
out2 = graph(p2, pos_b, 5.0, sig6, noise)
res["patches"] = {"forwards": len(forwards), "double_block": seen["double_block"], "post_input": seen["post_input"],
                  "equal_unpatched": bool(torch.equal(out2, base_graph["b_cfg5_6steps_emptyneg"]))}
def drop_last(args, extra):
    return {"img": args["img"], "txt": args["txt"]}
p3 = model.clone()
p3.set_model_patch_replace(drop_last, "dit", "double_block", n_blocks - 1)
res["patches"]["skip_block_changes"] = rel(graph(p3, pos_b, 5.0, sig6, noise), base_graph["b_cfg5_6steps_emptyneg"])

lap("patches")
# LoRA (LensLoraLoader) through the native graph vs LensSampler; lowvram partial load keeps the numbers
(lora_model,) = N["LensLoraLoader"]().apply(model, "a.safetensors", 1.0)
g_lora = graph(lora_model, pos_b, 5.0, sig6, noise)
s_lora = N["LensSampler"]().sample(lora_model, pos_b, neg, lat, 1234, 6, 5.0, 1.0)[0]["samples"]
res["lora"] = {"graph_vs_sampler": rel(g_lora, s_lora),
               "lora_changes": rel(g_lora, base_graph["b_cfg5_6steps_emptyneg"]),
               "base_after": bool(torch.equal(graph(model, pos_b, 5.0, sig6, noise), base_graph["b_cfg5_6steps_emptyneg"]))}
mm.unload_all_models()
model.load(model.load_device, lowvram_model_memory=1)
casting = sum(1 for m in inner.modules() if getattr(m, "prev_comfy_cast_weights", None) is not None)
low = graph(model, pos_b, 5.0, sig6, noise)
res["lowvram"] = {"casting_layers": casting, "equal": bool(torch.equal(low, base_graph["b_cfg5_6steps_emptyneg"]))}
lap("lora_lowvram")
res["loader_model_after_all_runs"] = NM.pack_model_patches(model)   # sampling left no model-level patch on it
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def result(golden_dir, tmp_path_factory):
    import torch

    import lora_fixtures as lf
    from fixtures import dit_config
    from lens_core.dit import LensTransformer

    comfyui_dir_or_skip()                  # before writing the LoRA
    tmp = tmp_path_factory.mktemp("native_model")
    (tmp / "models" / "loras").mkdir(parents=True)
    with torch.device("meta"):
        dit = LensTransformer(dit_config(golden_dir, "pipeline"))
    lf.write(tmp / "models" / "loras" / "a.safetensors", "kohya",
             lf.random_factors(dit, lf.target_names(dit), rank=4, alpha=2.0, seed=1, scale=0.2))
    res = run_script(SCRIPT, tmp, golden_dir, timeout=1800)
    (tmp / "result.json").write_text(json.dumps(res, indent=1))
    print(f"native-model figures ({tmp / 'result.json'}):", json.dumps(res))
    return res


def test_the_pack_model_is_a_native_model(result):
    k = result["kind"]
    assert k["patcher"] in ("ModelPatcher", "ModelPatcherDynamic") and k["model"] == "LensPackModel"
    assert k["base_model"] and k["dit"] == ["LensDiffusionModel", "LensTransformer"]
    assert k["latent_channels"] == 128 and k["downscale"] == 16
    assert k["latent_format"] in ("Flux2", "_BundledFlux2")
    assert {"ModelSamplingFlux", "CONST"} <= set(k["sampling"]) and k["shift"] == k["official_shift"]
    assert k["cfg_official"] and k["dtype"] == "torch.float32"
    assert k["keys"] == ["diffusion_model.img_in.bias", "diffusion_model.img_in.weight"]
    # previews: 2x2-unpatchified by ComfyUI's Flux2 format, latent resolution with the bundled one (0.3.64)
    assert result["preview_size"] == ([12, 8] if k["latent_format"] == "Flux2" else [6, 4])
    assert result["lens_preview_same"]          # LensSampler previews the MODEL as KSampler does


CASES = ("a_cfg1_4steps", "b_cfg5_6steps_emptyneg")


@pytest.mark.parametrize("name", CASES)
def test_sampler_custom_advanced_gives_the_official_latents(result, name):
    """Measured (ComfyUI 0.33, CPU, fp32): see README "Native nodes"."""
    r = result["cases"][name]
    assert r["graph_rel"] <= 1e-5 and r["graph_max_abs"] <= 1e-5, r
    assert r["sampler_rel"] <= 1e-5, r                  # LensSampler on the same MODEL (lens_core's sampler)
    if "cfgnorm_rel" in r:                              # CFGNorm(pre_cfg) = the MODEL's own official CFG
        assert r["cfgnorm_rel"] <= 1e-5, r
    assert r["graph_forwards"] == (4 if name.startswith("a") else 12)   # CFG 1: no uncond pass


def test_ksampler_runs_and_matches_official_at_1440(result):
    """KSampler euler/simple: at 1440² the MODEL's shift is the official mu, so the schedule and the latents
    are the official ones (from the same noise); at the tiny size the official mu depends on the step count and
    the schedule differs (numbers reported in README)."""
    k = result["ksampler"]
    big = k["1440x1440_4steps_cfg5"]
    assert big["sigma_max_diff"] <= 1e-6 and big["rel"] <= 1e-5 and big["forwards"] == 8, big
    for label in ("64x96_6steps_cfg5", "64x96_4steps_cfg1"):
        assert k[label]["sigma_max_diff"] > 0.01 and 1e-3 < k[label]["rel"] < 1.0, (label, k[label])
    assert k["64x96_4steps_cfg1"]["forwards"] == 4 and k["64x96_6steps_cfg5"]["forwards"] == 12


def test_easycache_runs_and_skips_forwards(result):
    """Threshold 0.5 on the tiny random-weight DiT, whose output moves ~30 % per step (a trained model moves far
    less, which is what the cache relies on): fewer forwards, a large deviation; the same skips as on native
    Lens from the same weights (ComfyUI 0.33)."""
    e = result["easycache"]
    assert e["uncached_forwards"] == 40
    assert e["forwards"] < e["uncached_forwards"] and 0 < e["rel_vs_uncached"] < 1.0, e
    # LensSampler on the cached MODEL goes through ComfyUI's sampling (the cache applies), same result
    assert "wrappers" in e["lens_sampler_routes"], e
    assert e["lens_sampler_forwards"] == e["forwards"] and e["lens_sampler_vs_graph"] == 0.0
    if "native_lens" in e:
        n = e["native_lens"]
        assert n["forwards"] == e["forwards"] and n["uncached_vs_ours"] <= 1e-5, n
        assert abs(n["rel_vs_uncached"] - e["rel_vs_uncached"]) <= 1e-3, n


def test_dit_block_replace_is_called_for_every_block(result):
    r = result["replace"]
    assert r["forwards"] == 12 and r["calls"] == list(range(r["blocks"])) * r["forwards"]
    assert r["equal_unpatched"]
    assert r["lens_sampler_calls"] == len(r["calls"]) and r["lens_sampler_equal_graph"]
    p = result["patches"]
    assert p["double_block"] == list(range(r["blocks"])) * p["forwards"] and p["post_input"] == p["forwards"]
    assert p["equal_unpatched"] and p["skip_block_changes"] > 1e-3


def test_sampling_leaves_the_model_unpatched(result):
    """After KSampler, SamplerCustomAdvanced, EasyCache / patched clones and LensSampler ran on it, the loader's
    MODEL still has no model-level patch (LensSampler keeps sampling it with the pack's own sampler)."""
    assert result["loader_model_after_all_runs"] == []


def test_lora_and_lowvram_through_the_native_graph(result):
    lo = result["lora"]
    assert lo["graph_vs_sampler"] <= 1e-5 and lo["lora_changes"] > 1e-2 and lo["base_after"]
    low = result["lowvram"]
    assert low["casting_layers"] > 0 and low["equal"]
