"""The pack's schedules against real ComfyUI (marked ``comfyui``; needs COMFYUI_DIR).

One script runs in the ComfyUI checkout's Python (../shared/tools/comfyui_headless.sh):

- LensSigmas ``simple`` (shift auto) equals native BasicScheduler("simple") on the native Lens MODEL patched by
  ModelSamplingFlux(1.15, 0.5, W, H) (the official ComfyUI Lens template), and ``simple`` with shift 1.829 equals
  BasicScheduler("simple") on the unpatched native MODEL, bit for bit, at several sizes and step counts;
- LensSampler's optional SIGMAS input: native BasicScheduler sigmas drive the pack's own model and the native
  MODEL; with the pack's model they equal LensSigmas("simple") sigmas bit for bit.

On a ComfyUI without native Lens (0.3.64) only the pack-side checks run (no native MODEL to compare with).
"""
from __future__ import annotations

import pytest

from comfyui_run import native_or_skip, run_script

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
from safetensors.torch import load_file
from lens_nodes_test.lens_core import schedules as SC
import nodes as core_nodes
from comfy_extras import nodes_custom_sampler as ncs, nodes_model_advanced as nma
from comfy_execution.validation import validate_node_input

res = {"native": hasattr(comfy.model_base, "Lens")}
res["sigmas_input_type"] = N["LensSampler"].INPUT_TYPES()["optional"]["sigmas"][0]
res["sigmas_validates"] = validate_node_input("SIGMAS", res["sigmas_input_type"])
tdir = golden + "/pipeline_tiny/transformer"
os.makedirs(f"{tmp}/diffusion_models", exist_ok=True)
folder_paths.add_model_folder_path("diffusion_models", f"{tmp}/diffusion_models", is_default=True)
os.symlink(tdir, f"{tmp}/diffusion_models/tiny")
(ours,) = N["LensModelLoader"]().load("tiny", "fp32", "lens")
d = load_file(f"{golden}/pipeline_tiny/cases/b_cfg5_6steps_emptyneg.fp32.safetensors")
pos = [[torch.cat([d[f"prompt_embeds_{i}"] for i in range(4)], -1),
        {"attention_mask": d["prompt_mask"].long(), "num_layers_stacked": 4}]]
neg = [[torch.zeros(1, 0, 256), {"attention_mask": torch.zeros(1, 0, dtype=torch.long), "num_layers_stacked": 4}]]
lat = {"samples": torch.zeros(1, 128, 4, 6)}

if res["native"]:
    os.symlink(tdir + "/diffusion_pytorch_model.safetensors", f"{tmp}/diffusion_models/lens_tiny_fp32.safetensors")
    (native,) = core_nodes.UNETLoader().load_unet("lens_tiny_fp32.safetensors", "default")
    res["native_shift"] = float(native.get_model_object("model_sampling").shift)
    res["template"], res["plain"], res["values"] = [], [], {}
    for w, h in ((96, 64), (512, 512), (1024, 1024), (1440, 1440), (2048, 1024), (1216, 1616)):
        flux = nma.ModelSamplingFlux().patch(native, 1.15, 0.5, w, h)[0]
        for steps in (1, 4, 20, 50, 1000):
            ref = out(ncs.BasicScheduler.execute(flux, "simple", steps, 1.0))[0]
            got = N["LensSigmas"]().get_sigmas(w, h, steps, 1.0, "lens", schedule="simple")[0]
            res["template"].append([w, h, steps, bool(torch.equal(ref.float(), got)), ref.dtype == got.dtype])
            ref = out(ncs.BasicScheduler.execute(native, "simple", steps, 1.0))[0]
            got = N["LensSigmas"]().get_sigmas(w, h, steps, 1.0, "lens", schedule="simple", shift=1.829)[0]
            res["plain"].append([w, h, steps, bool(torch.equal(ref.float(), got))])
    res["values"]["template_96x64_4"] = out(ncs.BasicScheduler.execute(
        nma.ModelSamplingFlux().patch(native, 1.15, 0.5, 96, 64)[0], "simple", 4, 1.0))[0].tolist()
    res["values"]["official_96x64_4"] = SC.sigma_schedule(4, 24).tolist()

    # LensSampler's SIGMAS input: native BasicScheduler sigmas on the pack's model = LensSigmas simple:1.829
    native_sig = out(ncs.BasicScheduler.execute(native, "simple", 6, 1.0))[0]
    ours_sig = N["LensSigmas"]().get_sigmas(96, 64, 6, 1.0, "lens", schedule="simple", shift=1.829)[0]
    a = N["LensSampler"]().sample(ours, pos, neg, lat, 1234, 0, 5.0, 1.0, sigmas=native_sig)[0]["samples"]
    b = N["LensSampler"]().sample(ours, pos, neg, lat, 1234, 0, 5.0, 1.0, sigmas=ours_sig)[0]["samples"]
    c = N["LensSampler"]().sample(native, pos, neg, lat, 1234, 6, 5.0, 1.0, sigmas=native_sig)[0]["samples"]
    o = N["LensSampler"]().sample(ours, pos, neg, lat, 1234, 6, 5.0, 1.0)[0]["samples"]
    rel = lambda x, y: float((x.float() - y.float()).norm() / y.float().norm())
    res["sampler"] = {"native_sigmas_equal_ours": bool(torch.equal(a, b)), "native_model_vs_ours": rel(c, a),
                      "simple_vs_official": rel(a, o), "finite": bool(torch.isfinite(c).all())}
# both versions: the official schedule through the SIGMAS input equals the steps widgets, bit for bit
sig = N["LensSigmas"]().get_sigmas(96, 64, 6, 1.0, "lens")[0]
a = N["LensSampler"]().sample(ours, pos, neg, lat, 1234, 0, 5.0, 1.0, sigmas=sig)[0]["samples"]
b = N["LensSampler"]().sample(ours, pos, neg, lat, 1234, 6, 5.0, 1.0)[0]["samples"]
res["official_input_equal_widgets"] = bool(torch.equal(a, b))
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def result(golden_dir, tmp_path_factory):
    return run_script(SCRIPT, tmp_path_factory.mktemp("schedules"), golden_dir)


@pytest.fixture(scope="module")
def native(result):
    return native_or_skip(result)


def test_sigmas_input_and_official_through_it(result):
    assert result["sigmas_input_type"] == "SIGMAS" and result["sigmas_validates"]
    assert result["official_input_equal_widgets"]


def test_simple_equals_native_basic_scheduler(native):
    assert native["native_shift"] == pytest.approx(1.829)
    assert len(native["template"]) == 30 and all(r[3] and r[4] for r in native["template"]), native["template"]
    assert all(r[3] for r in native["plain"]), native["plain"]
    assert native["values"]["template_96x64_4"] != native["values"]["official_96x64_4"]


def test_native_sigmas_drive_lens_sampler(native):
    s = native["sampler"]
    assert s["native_sigmas_equal_ours"] and s["finite"]
    assert s["native_model_vs_ours"] <= 1e-5        # same sigmas, same weights: native model vs the pack's
    assert s["simple_vs_official"] > 1e-3            # and the native schedule is really another schedule
