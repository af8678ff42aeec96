"""lens_core.dit host patch points (issue 24): transformer_options (the keys ComfyUI's native Lens model honours),
control, and the latent-layout entry forward_latents, on the tiny golden DiT.

Real ComfyUI driving them is in tests/test_comfyui_native_model.py; here the maths: a pass-through patch changes
nothing (bit for bit), the patches see what they are documented to see, and forward_latents equals the official
forward (golden dit_tiny) in ComfyUI's layout.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lens_core.config import LensDiTConfig, pack_latents, unpack_latents
from lens_core.dit import LensTransformer
from lens_core.sampling import model_timestep


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny(golden_dir):
    root = golden_dir / "dit_tiny" / "transformer"
    model = LensTransformer(LensDiTConfig.from_json(root / "config.json"))
    model.load_state_dict(load_file(str(root / "diffusion_pytorch_model.safetensors")))
    return model.eval()


@pytest.fixture(scope="module")
def case(golden_dir):
    d = load_file(str(golden_dir / "dit_tiny" / "io.safetensors"))
    feats = [d[f"encoder_hidden_states_{i}"] for i in range(4)]
    grid = tuple(int(v) for v in d["img_shape"][1:])
    return d, feats, grid


def run(model, case, exact=True, **kw):
    d, feats, grid = case
    with torch.no_grad():
        return model(d["hidden_states"], feats, d["encoder_hidden_states_mask"], d["timestep"], grid=grid,
                     exact=exact, **kw)


@pytest.mark.parametrize("exact", [True, False])
def test_pass_through_patches_change_nothing(tiny, case, exact):
    base = run(tiny, case, exact)
    seen = {"replace": [], "after": [], "post": 0}

    def replace(args, extra):
        seen["replace"].append((args["transformer_options"]["block_index"], args["transformer_options"]["total_blocks"],
                                args["transformer_options"]["block_type"], tuple(args["img"].shape),
                                tuple(args["vec"].shape)))
        return extra["original_block"](args)

    def after(args):
        seen["after"].append((args["block_index"], args["x"] is case[0]["hidden_states"]))
        return {"img": args["img"], "txt": args["txt"]}

    def post(args):
        seen["post"] += 1
        return {"img": args["img"], "txt": args["txt"]}

    n = len(tiny.transformer_blocks)
    opts = {"patches_replace": {"dit": {("double_block", i): replace for i in range(n)}},
            "patches": {"double_block": [after], "post_input": [post]}}
    out = run(tiny, case, exact, transformer_options=opts)
    assert torch.equal(out, base)
    b, s = case[0]["hidden_states"].shape[:2]
    assert [r[:3] for r in seen["replace"]] == [(i, n, "double") for i in range(n)]
    assert all(r[3] == (b, s, tiny.config.width) and r[4] == (b, tiny.config.width) for r in seen["replace"])
    assert seen["after"] == [(i, True) for i in range(n)] and seen["post"] == 1
    assert "block_index" not in opts            # the caller's dict is not written into
    assert torch.equal(run(tiny, case, exact, transformer_options={}), base)


def test_replace_and_control_change_the_output(tiny, case):
    base = run(tiny, case)
    skip_last = {"patches_replace": {"dit": {("double_block", len(tiny.transformer_blocks) - 1):
                                             lambda args, extra: {"img": args["img"], "txt": args["txt"]}}}}
    assert rel(run(tiny, case, transformer_options=skip_last), base) > 1e-3
    img = case[0]["hidden_states"]
    add = torch.full((img.shape[0], 3, tiny.config.width), 0.5)
    out = run(tiny, case, control={"input": [add]})
    assert rel(out, base) > 1e-3
    # control additions equal a double_block patch adding the same tensor to the first tokens
    def plus(args):
        if args["block_index"] != 0:
            return {"img": args["img"], "txt": args["txt"]}
        x = args["img"].clone()
        x[:, :3] += add
        return {"img": x, "txt": args["txt"]}
    assert torch.equal(run(tiny, case, transformer_options={"patches": {"double_block": [plus]}}), out)


@pytest.mark.parametrize("exact", [True, False])
def test_forward_latents_is_the_official_forward_in_comfy_layout(tiny, case, exact):
    d, feats, grid = case
    h, w = grid
    x = unpack_latents(d["hidden_states"], h, w)
    context = torch.cat(feats, dim=-1)
    seen = []
    opts = {"patches": {"double_block": [lambda a: seen.append(a["x"] is x) or {"img": a["img"], "txt": a["txt"]}]}}
    with torch.no_grad():
        out = tiny.forward_latents(x, d["timestep"], context, d["encoder_hidden_states_mask"].long(),
                                   transformer_options=opts, exact=exact)
        ref = tiny(d["hidden_states"], feats, d["encoder_hidden_states_mask"],
                   model_timestep(d["timestep"], torch.float32), grid=grid, exact=exact)
    assert out.shape == x.shape
    assert torch.equal(pack_latents(out), ref)
    assert rel(pack_latents(out), d["out"]) <= 1e-5        # the official forward's output (golden)
    assert seen == [True] * len(tiny.transformer_blocks)
    with torch.no_grad():                                   # no mask = every text position valid
        full = tiny.forward_latents(x, d["timestep"], context, None, exact=exact)
        ones = tiny.forward_latents(x, d["timestep"], context, torch.ones(context.shape[:2]), exact=exact)
    assert torch.equal(full, ones)


def test_forward_latents_rounds_the_timestep_officially(tiny, case):
    """bf16: the DiT gets bf16(bf16(σ·1000)/1000) (spec §4), not bf16(σ)."""
    d, feats, grid = case
    model = LensTransformer(tiny.config, dtype=torch.bfloat16)
    model.load_state_dict(tiny.state_dict())
    model.eval()
    h, w = grid
    x = unpack_latents(d["hidden_states"], h, w).bfloat16()
    sigma = torch.full((x.shape[0],), 0.994191)
    seen = []
    hook = model.time_text_embed.timestep_embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model.forward_latents(x, sigma, torch.cat(feats, -1).bfloat16(), d["encoder_hidden_states_mask"])
            model(pack_latents(x), feats, d["encoder_hidden_states_mask"], model_timestep(sigma, torch.bfloat16),
                  grid=grid)
    finally:
        hook.remove()
    assert torch.equal(seen[0], seen[1])
    assert model_timestep(sigma, torch.bfloat16)[0].item() == pytest.approx(0.996094, abs=1e-6)


def test_forward_latents_bad_inputs(tiny, case):
    d, feats, grid = case
    x = unpack_latents(d["hidden_states"], *grid)
    with pytest.raises(ValueError, match="latent"):
        tiny.forward_latents(d["hidden_states"], d["timestep"], torch.cat(feats, -1))
    with pytest.raises(ValueError, match="context"):
        tiny.forward_latents(x, d["timestep"], feats)
    with pytest.raises(ValueError, match="text features"):
        tiny.forward_latents(x, d["timestep"], torch.zeros(x.shape[0], 3, 7))
