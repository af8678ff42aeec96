"""lens_core.sampling: schedules, timestep quantisation, the whole denoising loop against the golden pipeline
runs, CFG single-pass vs batch-of-2, img2img, callbacks, noise."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lens_core import sampling as S
from lens_core.config import LensDiTConfig
from lens_core.dit import LensTransformer
from exactness import require_reference_kernels, run_exact
from test_dit import rel

CASES = {"a_cfg1_4steps": (4, 1.0), "b_cfg5_6steps_emptyneg": (6, 5.0)}


def case(golden_dir, name, dt):
    return load_file(str(golden_dir / "pipeline_tiny" / "cases" / f"{name}.{dt}.safetensors"))


@pytest.fixture(scope="module")
def pipe_dit(golden_dir):
    root = golden_dir / "pipeline_tiny" / "transformer"
    model = LensTransformer(LensDiTConfig.from_json(root / "config.json"))
    model.load_state_dict(load_file(str(root / "diffusion_pytorch_model.safetensors")))
    return model.eval()


# --- schedule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_schedule_matches_golden(golden_dir, name, dt):
    d = case(golden_dir, name, dt)
    steps = CASES[name][0]
    sig = S.sigma_schedule(steps, 24)
    assert sig.dtype == torch.float32
    assert (sig - d["sigmas"]).abs().max() <= 1e-7
    assert torch.equal(sig, d["sigmas"])  # in fact exactly
    assert torch.equal(S.scheduler_timesteps(sig), d["scheduler_timesteps"])
    dtype = torch.float32 if dt == "fp32" else torch.bfloat16
    tm = S.model_timesteps(sig, dtype)
    assert tm.dtype == dtype and torch.equal(tm, d["dit_timestep"][:, 0])


def test_schedule_spec_examples(golden_dir):
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert "1.9458947254741559" in text and "1.9307399746019704" in text
    assert S.empirical_mu(24, 4) == 1.9458947254741559
    assert S.empirical_mu(24, 6) == 1.9307399746019704
    # spec §4 table (values printed with 6 decimals; mu with 8)
    assert abs(S.empirical_mu(4096, 20) - 2.19802207) < 5e-9
    exp20 = [1, .994191, .987814, .980784, .972994, .964313, .954580, .943591, .931086, .916728, .900072,
             .880519, .857240, .829060, .794248, .750149, .692478, .613825, .500199, .321603, 0]
    assert (S.sigma_schedule(20, 4096) - torch.tensor(exp20)).abs().max() <= 5e-7
    assert abs(S.empirical_mu(4096, 4) - 2.29117989) < 5e-9
    assert (S.sigma_schedule(4, 4096) - torch.tensor([1, .967384, .908144, .767200, 0])).abs().max() <= 5e-7
    # 1440² (8100 tokens > 4300): mu does not depend on the steps
    assert abs(S.empirical_mu(8100, 4) - 1.82775366) < 5e-9 and S.empirical_mu(8100, 20) == S.empirical_mu(8100, 4)
    assert (S.sigma_schedule(4, 8100) - torch.tensor([1, .949134, .861494, .674617, 0])).abs().max() <= 5e-7
    # model timesteps (spec §4): bf16 quantisation, and fp32 is not always σ
    tm = S.model_timesteps(S.sigma_schedule(20, 4096), torch.bfloat16).float()
    assert tm[1].item() == pytest.approx(0.996094, abs=5e-7) and tm[6].item() == pytest.approx(0.957031, abs=5e-7)
    assert tm[19].item() == pytest.approx(0.322266, abs=5e-7)
    turbo = S.model_timesteps(S.sigma_schedule(4, 4096), torch.bfloat16).float()
    assert (turbo - torch.tensor([1, .96875, .90625, .769531])).abs().max() <= 5e-7
    sig8 = S.sigma_schedule(8, 4096)
    assert sig8[4].item() == pytest.approx(0.90618259, abs=5e-8)
    assert S.model_timesteps(sig8, torch.float32)[4].item() == pytest.approx(0.90618265, abs=1e-8)
    assert S.model_timesteps(sig8, torch.float32)[4] != sig8[4]


def test_schedule_errors():
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        S.sigma_schedule(0, 24)
    with pytest.raises(ValueError, match=r"denoise must be in \(0, 1\], got 1.5"):
        S.start_index(10, 1.5)


# --- the whole loop -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_loop_fp32_matches_golden(golden_dir, pipe_dit, name):
    d = case(golden_dir, name, "fp32")
    steps, g = CASES[name]
    feats = [d[f"prompt_embeds_{i}"] for i in range(4)]
    seen = []
    with torch.no_grad():
        out = S.sample(pipe_dit, d["noise"], feats, d["prompt_mask"], grid=(4, 6), steps=steps, cfg=g,
                       callback=lambda i, n, lat, x0: seen.append((i, n, lat.clone())))
    assert out.dtype == torch.float32 and out.shape == (1, 24, 128)
    assert rel(out, d["final_latents"]) <= 1e-5
    assert [s[:2] for s in seen] == [(i, steps) for i in range(steps)]
    for i, (_, _, lat) in enumerate(seen):
        assert rel(lat, d["step_latents"][i]) <= 1e-5
    # explicit empty negative (zeros + all-False) is the default; stacked features give the same result
    with torch.no_grad():
        out2 = S.sample(pipe_dit, d["noise"], torch.cat(feats, -1), d["prompt_mask"],
                        torch.zeros(1, 29, 256), torch.zeros(1, 29, dtype=torch.bool), grid=(4, 6),
                        steps=steps, cfg=g)
    assert torch.equal(out, out2)


@pytest.fixture(scope="module")
def loop_bf16_runs(golden_dir):
    """Cases a and b sampled in bf16 (reference-exact and fast), in the reference-kernel child (run once)."""
    code = f"""
import json, torch
from safetensors.torch import load_file
from lens_core.config import LensDiTConfig
from lens_core.dit import LensTransformer
from lens_core import sampling as S
P = {str(golden_dir / 'pipeline_tiny')!r}
m = LensTransformer(LensDiTConfig.from_json(P + '/transformer/config.json')).to(torch.bfloat16)
m.load_state_dict(load_file(P + '/transformer/diffusion_pytorch_model.safetensors'))
res = {{}}
for name, steps, g in (('a_cfg1_4steps', 4, 1.0), ('b_cfg5_6steps_emptyneg', 6, 5.0)):
    d = load_file(P + '/cases/' + name + '.bf16.safetensors')
    feats = [d[f'prompt_embeds_{{i}}'] for i in range(4)]
    lat, pred = [], []
    def model(x, f, mk, t, grid, exact):
        v = m(x, f, mk, t, grid=grid, exact=exact)
        c, u = v.chunk(2)
        pred.append(S.cfg_combine(c, u, g))
        return v
    with torch.no_grad():
        out = S.sample(model, d['noise'], feats, d['prompt_mask'], grid=(4, 6), steps=steps, cfg=g,
                       dtype=torch.bfloat16, callback=lambda i, n, l, x0: lat.append(l))
        fast = S.sample(m, d['noise'], feats, d['prompt_mask'], grid=(4, 6), steps=steps, cfg=g, exact=False)
    ref = d['final_latents']
    res[name] = dict(dtype=str(out.dtype),
                     final=bool(torch.equal(out, ref)),
                     latents=[bool(torch.equal(a, b)) for a, b in zip(lat, d['step_latents'])],
                     noise_pred=[bool(torch.equal(a, b)) for a, b in zip(pred, d['step_noise_pred'])],
                     rel=float((out.float() - ref.float()).norm() / ref.float().norm()),
                     fast_rel=float((fast.float() - ref.float()).norm() / ref.float().norm()))
print(json.dumps(res))
"""
    res = run_exact(code)
    print(json.dumps(res, indent=1))
    return res


def test_loop_bf16_bit_exact_in_reference_env(loop_bf16_runs):
    """Every step's latents and noise predictions equal the bf16 goldens bit for bit — where the goldens'
    kernels exist."""
    require_reference_kernels()
    for name, (steps, _) in CASES.items():
        r = loop_bf16_runs[name]
        assert r["final"] and all(r["latents"]) and all(r["noise_pred"]), r


def test_loop_bf16_within_bf16_tolerance_of_golden(loop_bf16_runs):
    """On every CPU: the bf16 loop (both paths) tracks the bf16 goldens to bf16 rounding level."""
    for name, (steps, _) in CASES.items():
        r = loop_bf16_runs[name]
        assert r["dtype"] == "torch.bfloat16" and len(r["latents"]) == steps == len(r["noise_pred"])
        assert r["rel"] <= 2e-2, r
        assert r["fast_rel"] <= 2e-2, r  # fast path: bf16 rounding level


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cfg1_single_pass_vs_batch_of_two(golden_dir, pipe_dit, dtype, tol):
    """cfg == 1 fast path (one forward on the positive, DiT fast mode) vs the reference batch of 2.

    Measured on this golden case: fp32 rel 1.6e-7 (max abs 1e-6); bf16 rel 3.8e-3 (max abs 0.031), i.e.
    bf16 rounding level (bf16 eps = 7.8e-3)."""
    d = case(golden_dir, "a_cfg1_4steps", "fp32" if dtype == torch.float32 else "bf16")
    model = LensTransformer(pipe_dit.config, dtype=dtype)
    model.load_state_dict(pipe_dit.state_dict())
    feats = [d[f"prompt_embeds_{i}"] for i in range(4)]
    calls = []

    def counting(x, *a, **k):
        calls.append(x.shape[0])
        return model(x, *a, **k)

    with torch.no_grad():
        two = S.sample(counting, d["noise"], feats, d["prompt_mask"], grid=(4, 6), steps=4, cfg=1.0, dtype=dtype)
        assert calls == [2] * 4
        calls.clear()
        one = S.sample(counting, d["noise"], feats, d["prompt_mask"], grid=(4, 6), steps=4, cfg=1.0,
                       exact=False, dtype=dtype)
        assert calls == [1] * 4
    diff = rel(one, two)
    print(f"cfg1 single pass vs batch of 2 ({dtype}): rel {diff:.3g}, max abs "
          f"{(one.float() - two.float()).abs().max().item():.3g}")
    assert one.dtype == two.dtype == dtype and diff <= tol
    assert rel(one, d["final_latents"]) <= tol


def test_cfg_combine_formula():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 5, 128, generator=g), torch.randn(2, 5, 128, generator=g)
    out = S.cfg_combine(cond, uncond, 3.0)
    comb = uncond + 3.0 * (cond - uncond)
    assert torch.allclose(out, comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    assert torch.allclose(out.norm(dim=-1), cond.norm(dim=-1))
    zero = S.cfg_combine(torch.zeros(1, 1, 128), torch.zeros(1, 1, 128), 5.0)  # norm 0 -> scale 1
    assert torch.equal(zero, torch.zeros(1, 1, 128))


# --- img2img, callback, noise ---------------------------------------------------------------------------------


class ConstVelocity:
    """A stand-in DiT: v = x − c (so x0 = c is a fixed point); records its inputs."""

    def __init__(self, c):
        self.c, self.calls = c, []

    def __call__(self, x, feats, mask, t, grid):
        self.calls.append((x.shape[0], t.clone(), x.clone()))
        return x - self.c


def test_img2img_start_and_steps():
    noise = S.make_noise(1, 1, 2, 3)
    x0 = torch.full((1, 6, 128), 0.25)
    feats, mask = [torch.zeros(1, 3, 8)] * 4, torch.ones(1, 3, dtype=torch.bool)
    fake = ConstVelocity(torch.zeros(()))
    S.sample(fake, noise, feats, mask, grid=(2, 3), steps=10, cfg=3.0, denoise=0.4, init_latents=x0)
    sig = S.sigma_schedule(10, 6)
    assert S.start_index(10, 0.4) == 6 and len(fake.calls) == 4
    first = fake.calls[0][2][:1]
    expected = (1 - sig[6]) * x0 + sig[6] * noise
    assert torch.allclose(first, expected) and torch.equal(fake.calls[0][2][1:], first)
    assert torch.equal(fake.calls[0][1], S.model_timesteps(sig, torch.float32)[6].expand(2))
    with pytest.raises(ValueError, match="init_latents: denoise < 1 needs the clean latents"):
        S.sample(fake, noise, feats, mask, grid=(2, 3), steps=10, cfg=3.0, denoise=0.5)
    # denoise 1 ignores init_latents and starts from the noise at sigma 1
    fake.calls.clear()
    S.sample(fake, noise, feats, mask, grid=(2, 3), steps=3, cfg=1.0, init_latents=x0, exact=False)
    assert len(fake.calls) == 3 and torch.equal(fake.calls[0][2], noise)


def test_callback_x0_replace_and_interrupt():
    noise = S.make_noise(2, 1, 2, 2)
    c = torch.full((1, 4, 128), 0.5)
    feats, mask = [torch.zeros(1, 2, 8)] * 4, torch.ones(1, 2, dtype=torch.bool)
    seen = []

    def cb(step, total, latents, x0):
        seen.append((step, total))
        assert torch.allclose(x0, c, atol=1e-6)  # v = x − c  ⇒  x − σ·v = c at σ = 1; in general x0 ≈ c
        return None

    out = S.sample(ConstVelocity(c), noise, feats, mask, grid=(2, 2), steps=1, cfg=1.0, exact=False, callback=cb)
    assert seen == [(0, 1)] and torch.allclose(out, c, atol=1e-6)

    class Stop(Exception):
        pass

    def interrupt(step, total, latents, x0):
        if step == 1:
            raise Stop
    fake = ConstVelocity(c)
    with pytest.raises(Stop):
        S.sample(fake, noise, feats, mask, grid=(2, 2), steps=5, cfg=1.0, exact=False, callback=interrupt)
    assert len(fake.calls) == 2
    fake = ConstVelocity(c)
    S.sample(fake, noise, feats, mask, grid=(2, 2), steps=2, cfg=1.0, exact=False,
             callback=lambda *a: torch.zeros(1, 4, 128))
    assert torch.equal(fake.calls[1][2], torch.zeros(1, 4, 128))


def test_negative_padding_and_batching():
    noise = S.make_noise(3, 2, 2, 2)
    pos = [torch.randn(2, 3, 8) for _ in range(4)]
    pmask = torch.tensor([[True, True, True], [True, True, False]])
    neg = [torch.randn(2, 5, 8) for _ in range(4)]
    nmask = torch.ones(2, 5, dtype=torch.bool)
    seen = []

    def fake(x, feats, mask, t, grid):
        seen.append((feats, mask))
        return torch.zeros_like(x)

    S.sample(fake, noise, pos, pmask, neg, nmask, grid=(2, 2), steps=1, cfg=4.0)
    feats, mask = seen[0]
    assert mask.shape == (4, 5) and torch.equal(mask[:2, 3:], torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(feats[0][:2, :3], pos[0]) and torch.equal(feats[0][:2, 3:], torch.zeros(2, 2, 8))
    assert torch.equal(feats[2][2:], neg[2]) and torch.equal(mask[2:], nmask)
    with pytest.raises(ValueError, match=r"pos_mask: expected \[B=2, S\] bool, got \(1, 3\)"):
        S.sample(fake, noise, pos, pmask[:1], grid=(2, 2), steps=1, cfg=4.0)
    with pytest.raises(ValueError, match=r"grid \(3, 3\): expected H'\*W' = S_img = 4, got 9"):
        S.sample(fake, noise, pos, pmask, grid=(3, 3), steps=1, cfg=4.0)
    with pytest.raises(ValueError, match=r"positive features: expected \[B, S\] = \(2, 3\)"):
        S.sample(fake, noise, [p[:, :2] for p in pos], pmask, grid=(2, 2), steps=1, cfg=4.0)


def test_make_noise(golden_dir):
    n = S.make_noise(1234, 1, 4, 6)
    assert n.dtype == torch.float32 and n.device.type == "cpu" and n.shape == (1, 24, 128)
    assert torch.equal(n, case(golden_dir, "a_cfg1_4steps", "fp32")["noise"])
    assert torch.equal(S.make_noise(7, 2, 3, 3), S.make_noise(7, 2, 3, 3))
    assert not torch.equal(S.make_noise(7, 1, 3, 3), S.make_noise(8, 1, 3, 3))
    assert torch.equal(n.bfloat16(), torch.randn((1, 24, 128), generator=torch.Generator().manual_seed(1234),
                                                 dtype=torch.bfloat16))


def test_fast_cfg_two_cropped_passes_match_golden(golden_dir, pipe_dit):
    """exact=False at cfg 5: positive and negative run as two forwards, each without its all-padding text
    columns (the empty negative with no text at all); fp32 result equals the golden run to float noise."""
    d = case(golden_dir, "b_cfg5_6steps_emptyneg", "fp32")
    feats = [d[f"prompt_embeds_{i}"] for i in range(4)]
    calls = []

    def counting(x, f, mask, t, grid, exact):
        calls.append((x.shape[0], mask.shape[1], bool(mask.all())))
        return pipe_dit(x, f, mask, t, grid=grid, exact=exact)

    # pad the positive with 3 masked columns: they must be cropped before the forward
    pad = [torch.cat([f, torch.randn(1, 3, f.shape[-1])], 1) for f in feats]
    pmask = torch.cat([d["prompt_mask"], torch.zeros(1, 3, dtype=torch.bool)], 1)
    with torch.no_grad():
        out = S.sample(counting, d["noise"], pad, pmask, grid=(4, 6), steps=6, cfg=5.0, exact=False)
    s = d["prompt_mask"].shape[1]
    assert calls == [(1, s, bool(d["prompt_mask"].all())), (1, 0, True)] * 6
    diff = rel(out, d["final_latents"])
    print(f"fast cfg-5 (two cropped passes) vs golden fp32: rel {diff:.3g}")
    assert diff <= 1e-5
