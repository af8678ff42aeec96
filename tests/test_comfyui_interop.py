"""lens-nodes beside ComfyUI's native Lens support (ComfyUI >= 0.22; marked ``comfyui``, run in-process with the
real ComfyUI of COMFYUI_DIR through ../shared/tools/comfyui_headless.sh).

Native loaders build GPT-OSS-20B and the FLUX.2 VAE with fixed real-size configs, so the tiny test weights are
turned into native models in-process with ComfyUI's own classes and loaders: the native DiT comes from ComfyUI's
``load_diffusion_model`` on the tiny Comfy-Org-layout file (UNETLoader's code path, which sizes the DiT from the
weights), the native ``lens`` CLIP from ``load_clip(..., CLIPType.LENS)`` on the tiny NVFP4 file with the
``gpt_oss_config`` / ``selected_layers`` model options of ComfyUI's own GPT-OSS encoder set to the tiny config,
and the native VAE from ``comfy.sd.VAE`` (VAELoader's code path) on a real-size FLUX.2 VAE file with random
weights (ComfyUI sizes it from its fixed defaults, which the tiny VAE does not match).
"""
from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from conftest import comfyui_dir_or_skip

pytestmark = pytest.mark.comfyui

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = (REPO.parent / "shared" / "tools" / "comfyui_headless.sh").resolve()

SCRIPT = r'''
import importlib.util, json, pathlib, sys, torch
repo, golden, tokenizer_json, pipeline_dir, work = sys.argv[1:6]
sys.path += [repo, repo + "/tests"]      # after ComfyUI: its nodes.py, not our nodes/ package
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_base, comfy.model_management as mm, comfy.sd, comfy.utils, folder_paths
if not hasattr(comfy.model_base, "Lens"):
    print(json.dumps({"native_lens": False})); sys.exit(0)
import nodes
from safetensors.torch import save_file
from fixtures import te_config, write_comfy_dit_bf16, write_comfy_te_nvfp4
work, golden = pathlib.Path(work), pathlib.Path(golden)
models = work / "models"
models.mkdir()
(models / "Lens-tiny").symlink_to(pipeline_dir)
folder_paths.add_model_folder_path("diffusion_models", str(models), is_default=True)
spec = importlib.util.spec_from_file_location("lens_nodes_inproc", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_inproc"] = pack; spec.loader.exec_module(pack)
N = pack.NODE_CLASS_MAPPINGS
from lens_core import sampling as core_sampling, vae as core_vae
out = {"native_lens": True}
PROMPT = "a red cube on a wooden table"

model, te, vae = N["LensCheckpointLoader"]().load("Lens-tiny")
enc = N["LensTextEncode"]()
(pos,), (neg,) = enc.encode(te, PROMPT), enc.encode(te, "")

# --- the native lens CLIP (ComfyUI's GPT-OSS encoder) from the same weights, tiny config via its model options
cfg = te_config(golden)
te_file = write_comfy_te_nvfp4(work / "gpt_oss_tiny_nvfp4.safetensors", golden, tokenizer_json)
gpt = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                           "sliding_window")}
layers = tuple(te.module.selected_layers)
clip = comfy.sd.load_clip([str(te_file)], clip_type=comfy.sd.CLIPType.LENS,
                          model_options={"gpt_oss_config": gpt, "selected_layers": layers})
(npos,) = nodes.CLIPTextEncode().encode(clip, PROMPT)
(nneg,) = nodes.CLIPTextEncode().encode(clip, "")
a, b = pos[0][0].float(), npos[0][0].float()
out["cond_shapes"] = [list(a.shape), list(b.shape)]
out["cond_masks_equal"] = bool(torch.equal(pos[0][1]["attention_mask"].bool(), npos[0][1]["attention_mask"].bool()))
out["cond_max_rel_diff"] = float((a - b).abs().max() / a.abs().max()) if a.shape == b.shape else None
out["neg_shapes"] = [list(neg[0][0].shape), list(nneg[0][0].shape)]

# native CLIPTextEncode -> LensSampler (native empty negative included)
(lat,) = N["LensEmptyLatent"]().generate("custom", 1024, 96, 64, 1)
ours = N["LensSampler"]().sample(model, pos, neg, lat, 7, 4, 5.0, 1.0)[0]["samples"]
mixed = N["LensSampler"]().sample(model, npos, nneg, lat, 7, 4, 5.0, 1.0)[0]["samples"]
out["native_cond_to_lens_sampler"] = list(mixed.shape)
out["native_cond_sample_rel_diff"] = float((ours - mixed).abs().max() / ours.abs().max())

# native EmptyFlux2LatentImage / EmptyLatentImage -> LensSampler
from comfy_extras.nodes_flux import EmptyFlux2LatentImage
flux2 = EmptyFlux2LatentImage.execute(96, 64, 1)
flux2 = flux2.result[0] if hasattr(flux2, "result") else flux2[0]
from_flux2 = N["LensSampler"]().sample(model, pos, neg, flux2, 7, 4, 5.0, 1.0)[0]["samples"]
(sd_latent,) = nodes.EmptyLatentImage().generate(96, 64, 1)
from_sd = N["LensSampler"]().sample(model, pos, neg, sd_latent, 7, 4, 5.0, 1.0)[0]["samples"]
out["empty_flux2_equal"] = bool(torch.equal(from_flux2, ours))
out["empty_latent_equal"] = bool(torch.equal(from_sd, ours))

# LensTextEncode (and the native encoder) -> a native sampler on the native Lens DiT built from the same weights
dit_file = write_comfy_dit_bf16(work / "lens_tiny_bf16.safetensors", golden, which="pipeline")
native = comfy.sd.load_diffusion_model(str(dit_file))
out["native_model"] = type(native.model).__name__
ks = lambda p, n: nodes.KSampler().sample(native, 7, 4, 1.0, "euler", "simple", p, n, flux2)[0]["samples"]
from_ours, from_native = ks(pos, neg), ks(npos, nneg)
out["lens_cond_to_ksampler"] = [list(from_ours.shape), bool(torch.isfinite(from_ours).all())]
out["ksampler_cond_rel_diff"] = float((from_ours - from_native).abs().max() / from_native.abs().max())

# our LATENT -> native VAEDecode with a native FLUX.2 VAE (real-size config, random weights, saved once)
torch.manual_seed(0)
rand_vae = core_vae.LensVAE(core_vae.REAL_VAE_CONFIG, dtype=torch.float32).eval()
with torch.no_grad():
    for name, p in rand_vae.named_parameters():
        if name.endswith("weight") and p.dim() > 1:
            p.copy_(torch.randn_like(p) * (1.0 / p[0].numel()) ** 0.5)
    sd = {k: v.contiguous() for k, v in rand_vae.state_dict().items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = torch.rand_like(sd[k]) + 0.5
        elif k.endswith("running_mean"):
            sd[k] = torch.randn_like(sd[k]) * 0.1
vae_dir = models / "vae"
vae_dir.mkdir()
save_file(sd, str(vae_dir / "flux2-vae-random.safetensors"))
folder_paths.add_model_folder_path("vae", str(vae_dir), is_default=True)
del rand_vae, sd
(native_vae,) = nodes.VAELoader().load_vae("flux2-vae-random.safetensors")
lens_vae = pack.NODE_CLASS_MAPPINGS["LensVAELoader"]().load("flux2-vae-random.safetensors")[0]
sample = {"samples": ours[:, :, :2, :3].contiguous()}          # [1,128,2,3] -> 32x48 pixels
(img_native,) = nodes.VAEDecode().decode(native_vae, sample)
(img_ours,) = N["LensVAEDecode"]().decode(lens_vae, sample, "off")
out["vae_shapes"] = [list(img_ours.shape), list(img_native.shape)]
out["vae_max_abs_diff"] = float((img_ours.float() - img_native.float()).abs().max())

# names: our node ids, custom types and template names never clash with the native ones
import asyncio, inspect
pending = nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
if inspect.isawaitable(pending):
    asyncio.run(pending)
core = set(nodes.NODE_CLASS_MAPPINGS)
out["id_clashes"] = sorted(set(N) & core)
native_types = set()
for cls in nodes.NODE_CLASS_MAPPINGS.values():
    try:
        native_types |= {t for t in getattr(cls, "RETURN_TYPES", ()) if isinstance(t, str)}
    except TypeError:
        pass
ours_types = {t for cls in N.values() for t in cls.RETURN_TYPES}
custom = {t for t in ours_types if t.startswith("LENS_")}
out["custom_types"] = sorted(custom)
out["type_clashes"] = sorted(custom & native_types)               # a custom type must not be a native type
out["standard_types_not_native"] = sorted(ours_types - custom - native_types)   # and the rest must be native
try:
    import comfyui_workflow_templates as wt
    native_templates = {getattr(t, "template_id", None) or getattr(t, "id", None) for t in wt.iter_templates()}
except Exception:
    native_templates = set()
ours_templates = {p.stem for p in (pathlib.Path(repo) / "workflows").glob("*.json")}
out["native_lens_templates"] = sorted(t for t in native_templates if t and "lens" in t)
out["template_clashes"] = sorted(ours_templates & native_templates)

# numbers where native and official differ: the schedule of the native template (ModelSamplingFlux 1.15/0.5 +
# simple scheduler) vs the official empirical-mu schedule, the timestep the DiT receives, QK-norm eps
from comfy_extras.nodes_model_advanced import ModelSamplingFlux
from comfy_extras.nodes_custom_sampler import BasicScheduler
sched = {}
for size in (512, 1024, 1440):
    (patched,) = ModelSamplingFlux().patch(native, 1.15, 0.5, size, size)
    s = BasicScheduler.execute(patched, "simple", 20, 1.0)
    s = (s.result[0] if hasattr(s, "result") else s[0]).float()
    official = core_sampling.sigma_schedule(20, (size // 16) ** 2).float()
    d = (s - official).abs()
    i = int(d.argmax())
    sched[size] = {"max_diff": float(d.max()), "step": i, "official": float(official[i]), "native": float(s[i])}
out["schedule_1440_vs_1024"] = sched
sig = core_sampling.sigma_schedule(20, (1440 // 16) ** 2)[:6]
# official: 1000·t with t = bf16(bf16(1000σ)/1000), the product in fp32; native: σ cast to the bf16 activations,
# then 1000·σ inside ComfyUI's flux timestep_embedding, computed (rounded) in bf16
official_t = core_sampling.model_timesteps(sig, torch.bfloat16)
out["timesteps_official"] = [round(1000.0 * float(t), 2) for t in official_t][:5]
out["timesteps_native"] = [float(t) for t in (sig.to(torch.bfloat16) * 1000.0).float()][:5]
blk = native.model.diffusion_model.transformer_blocks[0]
out["qk_norm_eps"] = {"native": float(blk.attn.norm_q.eps),
                      "ours": float(model.model.diffusion_model.transformer_blocks[0].attn.norm_q.eps)}
print(json.dumps(out))
'''


def test_native_lens_interop(golden_dir, tokenizer_json, pipeline_dir, tmp_path):
    """Both ways where the types allow: native CLIPTextEncode (native ``lens`` CLIP) -> LensSampler;
    LensTextEncode -> native KSampler on the native Lens DiT; native EmptyFlux2LatentImage / EmptyLatentImage ->
    LensSampler; LensSampler's LATENT -> native VAEDecode with a native FLUX.2 VAE; no clash of node ids,
    custom types or template names; and the numbers where the native path differs from the official one."""
    comfy_dir = comfyui_dir_or_skip()
    script = tmp_path / "interop.py"
    script.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(["bash", str(TOOL), "python", comfy_dir, str(script), str(REPO), str(golden_dir),
                           str(tokenizer_json), str(pipeline_dir), str(work)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(r, indent=1))
    if not r["native_lens"]:
        pytest.skip("this ComfyUI has no native Lens support (added in 0.22, May 2026)")
    # the native encoder and ours: same layout, same mask, same numbers up to NVFP4/MXFP4 re-encoding + rounding
    assert r["cond_shapes"][0] == r["cond_shapes"][1] and r["cond_masks_equal"]
    assert r["cond_max_rel_diff"] < 1e-2
    assert r["neg_shapes"][0][1] == r["neg_shapes"][1][1] == 0          # both: zero-length "no text" negative
    assert r["native_cond_to_lens_sampler"] == [1, 128, 4, 6] and r["native_cond_sample_rel_diff"] < 5e-2
    assert r["empty_flux2_equal"] and r["empty_latent_equal"]
    assert r["native_model"] == "Lens" and r["lens_cond_to_ksampler"] == [[1, 128, 4, 6], True]
    assert r["ksampler_cond_rel_diff"] < 5e-2
    assert r["vae_shapes"][0] == r["vae_shapes"][1] == [1, 32, 48, 3]
    assert r["vae_max_abs_diff"] < 1e-3
    assert r["custom_types"] == ["LENS_TEXT_ENCODER", "LENS_VAE"]     # the DiT is a native MODEL (issue 24)
    assert r["id_clashes"] == [] and r["type_clashes"] == [] and r["template_clashes"] == []
    assert r["standard_types_not_native"] == []          # LATENT, IMAGE, CONDITIONING, SIGMAS, NOISE: native types
    s = r["schedule_1440_vs_1024"]
    assert s["1440"]["max_diff"] < 1e-4 < s["1024"]["max_diff"] and s["512"]["max_diff"] > 0.1
    off, nat = r["timesteps_official"], r["timesteps_native"]
    assert all(t == round(t) and t % 4 == 0 for t in nat[1:]) and off[1:] != nat[1:]      # bf16-rounded 1000·σ
    assert max(abs(a - b) for a, b in zip(off, nat)) < 4
    assert r["qk_norm_eps"] == {"native": 1e-5, "ours": 1e-6}
