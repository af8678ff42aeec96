"""ComfyUI's ``.comfy_quant`` formats in a real ComfyUI (marked ``comfyui``; needs COMFYUI_DIR; ComfyUI 0.33 with
comfy-kitchen). One script runs in the ComfyUI checkout's Python (tests/comfyui_run.py):

- every format (tiny DiTs written by comfy-kitchen's quantizers): each quantized layer of the DiT the pack's
  LensModelLoader built gives the output of ComfyUI's own quantized Linear (``comfy.ops.pick_operations`` with a
  quant config = ``mixed_precision_ops`` with the CPU's disabled formats, loading the same layer tensors and
  comfy_quant through its ``_load_from_state_dict``), in fp32 and bf16;
- LensModelLoader loads an int8 ConvRot and a ConvRot W4A4 file (kept quantized: the ComfyUI storage classes) and
  LensSampler samples them: finite latents close to the bf16 file's;
- LoRA on the int8 ConvRot model through LensLoraLoader (weight wrappers) equals the hand merge of the
  dequantized weight after a full load and after a lowvram (partial) load; a patch added with ``add_patches``
  (any node's merge route) is merged through convert_weight/set_weight and unpatched back to the int8 storage.
"""
from __future__ import annotations

import pytest

from comfyui_run import run_script

pytestmark = pytest.mark.comfyui

SCRIPT = r'''
sys.path += [repo, repo + "/tests"]      # after ComfyUI's own modules: fixtures (writes files via comfy-kitchen)
import torch.nn.functional as F
import comfy.ops
from safetensors.torch import load_file
import fixtures as fx, lora_fixtures as lf
from lens_nodes_test.lens_core import quant_linear as ql
from lens_nodes_test.nodes import bridge

import importlib.util
res = {"quant_ops": importlib.util.find_spec("comfy.quant_ops") is not None}    # ComfyUI 0.27+
try:
    import comfy_kitchen
    res["kitchen"] = comfy_kitchen.__version__ if hasattr(comfy_kitchen, "__version__") else "present"
except ImportError:
    res["kitchen"] = None
if not (res["quant_ops"] and res["kitchen"]):
    print(json.dumps(res)); sys.exit(0)
FORMATS = {
    "float8_e4m3fn": {}, "float8_e5m2": {}, "mxfp8": {}, "nvfp4": {},
    "int8_tensorwise": {"convrot": True, "convrot_groupsize": 64},
    "convrot_w4a4": {"convrot_groupsize": 64, "linear_dtype": "int4"},
    "asym_w4a8_int8": {"group_size": 16, "convrot_groupsize": 64},
}
dm = f"{tmp}/diffusion_models"
os.makedirs(dm, exist_ok=True)
folder_paths.add_model_folder_path("diffusion_models", dm, is_default=True)
files = {}
for fmt, opts in FORMATS.items():
    files[fmt] = fx.write_comfy_dit_quant(f"{dm}/lens_{fmt}.safetensors", golden, (fmt, opts), which="pipeline")
fx.write_comfy_dit_bf16(f"{dm}/lens_bf16.safetensors", golden, which="pipeline")

class QuantConfig:          # what ComfyUI's model config carries for a quantized checkpoint
    quant_config = {"layers": "detected per layer"}

x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(0))
res["layers"] = {}
for fmt, (path, layers) in files.items():
    sd = load_file(str(path))
    worst = 0.0
    for dt, wd in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        ops = comfy.ops.pick_operations(dt, dt, load_device=torch.device("cpu"), model_config=QuantConfig())
        (model,) = N["LensModelLoader"]().load(f"lens_{fmt}.safetensors", wd, "lens")
        for layer in layers:
            mod = model.model.diffusion_model.get_submodule(layer)
            assert type(mod).__module__.endswith("bridge.quant") and isinstance(mod, ql.QuantLinear), type(mod)
            if mod.in_features != 128:
                continue
            ref = ops.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="cpu", dtype=dt)
            own = {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".")}
            missing, unexpected = ref.load_state_dict(own, strict=False)
            assert not unexpected, unexpected
            with torch.no_grad():
                want, got = ref(x.to(dt)).float(), mod(x.to(dt)).float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    res["layers"][fmt] = {"n": len(layers), "max_rel": worst, "disabled_on_cpu": sorted(ops._disabled)}

lat = {"samples": torch.zeros(1, 128, 4, 6)}
d = load_file(f"{golden}/pipeline_tiny/cases/b_cfg5_6steps_emptyneg.fp32.safetensors")
pos = [[torch.cat([d[f"prompt_embeds_{i}"] for i in range(4)], -1),
        {"attention_mask": d["prompt_mask"].long(), "num_layers_stacked": 4}]]
neg = [[torch.zeros(1, 0, 256), {"attention_mask": torch.zeros(1, 0, dtype=torch.long), "num_layers_stacked": 4}]]
rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
samples = {}
for name in ("bf16", "int8_tensorwise", "convrot_w4a4"):
    (model,) = N["LensModelLoader"]().load(f"lens_{name}.safetensors", "default", "lens")
    kept = sum(isinstance(m, ql.QuantLinear) for m in model.model.diffusion_model.modules())
    samples[name] = N["LensSampler"]().sample(model, pos, neg, lat, 1234, 4, 5.0, 1.0)[0]["samples"]
    res.setdefault("sample", {})[name] = {"quantized_layers": kept, "finite": bool(torch.isfinite(samples[name]).all()),
                                          "shape": list(samples[name].shape)}
for name in ("int8_tensorwise", "convrot_w4a4"):
    res["sample"][name]["rel_to_bf16"] = rel(samples[name], samples["bf16"])

# LoRA on the int8 ConvRot model: weight wrappers, full and lowvram loads; the merge route of add_patches
(model,) = N["LensModelLoader"]().load("lens_int8_tensorwise.safetensors", "fp32", "lens")
layer = "transformer_blocks.0.attn.img_qkv"
mod = model.model.diffusion_model.get_submodule(layer)
shapes = {layer: (mod.out_features, mod.in_features)}
class Shapes:
    def get_submodule(self, n):
        return type("W", (), {"weight": torch.empty(shapes[n], device="meta")})()
factors = lf.random_factors(Shapes(), [layer], rank=4, alpha=2.0, seed=4)
os.makedirs(f"{tmp}/loras", exist_ok=True)
folder_paths.add_model_folder_path("loras", f"{tmp}/loras", is_default=True)
lf.write(f"{tmp}/loras/q.safetensors", "kohya", factors)
(lora_model,) = N["LensLoraLoader"]().apply(model, "q.safetensors", 0.7)
hand = mod.dequantized_weight(torch.float32) + 0.7 * lf.hand_delta(factors[layer], 2.0 / 4).float()
xin = torch.randn(5, 128)
want = F.linear(xin, hand, mod.bias)
base = mod(xin)            # the layer's own (W8A8) output without the LoRA
p = lora_model                   # the native MODEL (a ModelPatcher)
key = "diffusion_model." + layer + ".weight"
res["lora"] = {"wrappers": len(p.weight_wrapper_patches.get(key, [])),
               "merge_patches": len(p.patches)}
p.load(torch.device("cpu"), full_load=True)
res["lora"]["full_functions"] = len(mod.weight_function)
res["lora"]["full_rel"] = rel(mod(xin), want)
res["lora"]["full_storage"] = str(mod.weight.dtype)
p.unpatch_model(torch.device("cpu"))
p.load(torch.device("cpu"), lowvram_model_memory=1)
res["lora"]["lowvram_functions"] = len(mod.weight_function)
res["lora"]["lowvram_rel"] = rel(mod(xin), want)
p.unpatch_model(torch.device("cpu"))
res["lora"]["after_unpatch_functions"] = len(mod.weight_function)
res["lora"]["base_equal_after"] = bool(torch.equal(mod(xin), base))
# a node using the merge route (add_patches): merged onto the dequantized weight, unpatched back to int8
import comfy.weight_adapter as wa
f = factors[layer].t
mp = model.clone()
mp.add_patches({key: wa.LoRAAdapter(set(), (f["up"], f["down"], None, None, None, None))}, 0.7 * 2.0 / 4)
mp.load(torch.device("cpu"), full_load=True)
res["merge"] = {"storage_while_patched": str(mod.weight.dtype), "rel": rel(mod(xin), want)}
mp.unpatch_model(torch.device("cpu"))
res["merge"]["storage_after"] = str(mod.weight.dtype)
res["merge"]["base_equal_after"] = bool(torch.equal(mod(xin), base))
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def script_result(golden_dir, tmp_path_factory):
    return run_script(SCRIPT, tmp_path_factory.mktemp("comfyui_quant"), golden_dir, timeout=1500)


@pytest.fixture(scope="module")
def result(script_result):
    if not script_result["quant_ops"]:
        pytest.skip("this ComfyUI has no quantized formats (comfy.quant_ops and comfy-kitchen arrived in 0.27)")
    return script_result


def test_kitchen_present(result):
    assert result["kitchen"], "ComfyUI 0.27+ installs comfy-kitchen; the comfyui suite runs against it"


def test_each_layer_equals_comfyui_quantized_linear(result):
    assert set(result["layers"]) == {"float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4", "int8_tensorwise",
                                     "convrot_w4a4", "asym_w4a8_int8"}
    for fmt, r in result["layers"].items():
        assert r["n"] > 0
        assert r["max_rel"] <= 1e-6, (fmt, r)     # fp32 rounding (in practice bit for bit)


def test_loader_node_loads_int8_convrot_and_w4a4_and_samples(result):
    s = result["sample"]
    for name in ("int8_tensorwise", "convrot_w4a4"):
        assert s[name]["quantized_layers"] > 0 and s[name]["finite"] and s[name]["shape"] == [1, 128, 4, 6]
    assert s["int8_tensorwise"]["rel_to_bf16"] <= 0.03
    assert s["convrot_w4a4"]["rel_to_bf16"] <= 0.15


def test_lora_on_int8_convrot_through_comfyui(result):
    lo, mg = result["lora"], result["merge"]
    assert lo["wrappers"] == 1 and lo["merge_patches"] == 0
    assert lo["full_functions"] >= 1 and lo["full_rel"] <= 1e-6 and lo["full_storage"] == "torch.int8"
    assert lo["lowvram_functions"] >= 1 and lo["lowvram_rel"] <= 1e-6
    assert lo["base_equal_after"]
    assert mg["rel"] <= 1e-6 and mg["storage_after"] == "torch.int8" and mg["base_equal_after"]
