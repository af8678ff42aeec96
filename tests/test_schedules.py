"""lens_core.schedules (the registry: official, native "simple") and the composable sampler pieces of
lens_core.sampling (sample(sigmas=...), the CFG modes, img2img start, inpainting), the pipeline's and the CLI's
``schedule``. The native schedule against real ComfyUI: recorded 0.33 values here, live in
tests/test_comfyui_schedules.py (marked comfyui)."""
from __future__ import annotations

import json
import shlex

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lens_core import sampling as S
from lens_core import schedules as SC
from lens_core.prompt import DEFAULT_TEMPLATE_DATE
from test_sampling import pipe_dit  # noqa: F401  (fixture re-exported)

# ComfyUI 0.33.0, recorded with: ModelSamplingFlux + CONST model_sampling, set_parameters(shift=SHIFT),
# comfy.samplers.calculate_sigmas(ms, "simple", STEPS) (float32 values, printed as Python floats)
COMFY_033_SIMPLE = {
    (1.829, 4): [1.0, 0.949194610118866, 0.8616425395011902, 0.6748903393745422, 0.0],
    (1.15, 4): [1.0, 0.9045307636260986, 0.7595109343528748, 0.5128440856933594, 0.0],
    (0.5, 3): [1.0, 0.7673302292823792, 0.4519370496273041, 0.0],
    (3.23, 6): [1.0, 0.9921543598175049, 0.9806076884269714, 0.9619477391242981, 0.9267057180404663,
                0.8349056839942932, 0.0],
    (1.829, 20): [1.0, 0.9916194677352905, 0.9824711680412292, 0.9724442958831787, 0.9614058136940002,
                  0.949194610118866, 0.9356135129928589, 0.9204179048538208, 0.9033021330833435, 0.8838773369789124,
                  0.8616425395011902, 0.8359405994415283, 0.8058919906616211, 0.7702919840812683,
                  0.7274458408355713, 0.6748903393745422, 0.6089035868644714, 0.5235822200775146,
                  0.4089701175689697, 0.24685828387737274, 0.0],
}
# the same ComfyUI's ModelSamplingFlux table (10000 entries) at shift 1.829: first, middle, float64 sum
COMFY_033_TABLE_1829 = (0.0006224401877261698, 0.8616425395011902, 7745.43566897494)


# --- the registry --------------------------------------------------------------------------------------------


def test_registry_names_and_specs():
    assert SC.schedule_names()[:2] == ["official", "simple"]
    assert SC.parse_schedule("official") == ("official", None)
    assert SC.parse_schedule(" Simple ") == ("simple", None)
    assert SC.parse_schedule("simple:1.829") == ("simple", 1.829)
    assert SC.format_schedule("simple", 1.829) == "simple:1.829" and SC.format_schedule("official") == "official"
    with pytest.raises(ValueError, match=r"schedule: unknown schedule 'karras'; expected one of \['official', "
                                         r"'simple'"):
        SC.parse_schedule("karras")
    with pytest.raises(ValueError, match="the official schedule takes no shift"):
        SC.parse_schedule("official:2")
    with pytest.raises(ValueError, match=r"expected simple:SHIFT with a number, e.g. simple:1.829"):
        SC.parse_schedule("simple:abc")
    with pytest.raises(ValueError, match=r"schedule shift: expected a finite number in \[0.0, 10.0\], found nan"):
        SC.parse_schedule("simple:nan")
    with pytest.raises(ValueError, match="expected a schedule name"):
        SC.parse_schedule(None)
    with pytest.raises(ValueError, match="the official schedule takes no shift"):
        SC.build_sigmas("official", 4, 24, shift=1.5)


def test_official_entry_is_the_official_schedule():
    for steps, tokens in ((4, 24), (20, 4096), (50, 8100), (1000, 16384)):
        assert torch.equal(SC.build_sigmas("official", steps, tokens), S.sigma_schedule(steps, tokens))
    assert torch.equal(SC.build_sigmas("official", 10, 24, 0.4), S.sigma_schedule(10, 24)[6:])
    assert torch.equal(S.denoise_sigmas(10, 24, 0.4), S.sigma_schedule(10, 24)[6:])


def test_simple_equals_comfyui_033():
    for (shift, steps), ref in COMFY_033_SIMPLE.items():
        got = SC.simple_schedule(steps, 4096, shift)
        assert got.dtype == torch.float32 and got.tolist() == ref, (shift, steps)
    table = SC._flux_table(1.829)
    assert table.shape == (10000,) and table.dtype == torch.float32
    assert (float(table[0]), float(table[4999]), float(table.double().sum())) == COMFY_033_TABLE_1829


def test_simple_default_shift_is_the_template_model_sampling_flux():
    """None = ModelSamplingFlux(max_shift 1.15, base_shift 0.5) at the image size: 1.15 at 4096 tokens (1024²),
    0.5 at 256, and ≈ the official mu above 4300 tokens (1440²: 1.82776 vs 1.82775)."""
    assert SC.model_sampling_flux_shift(4096) == pytest.approx(1.15, abs=1e-12)
    assert SC.model_sampling_flux_shift(256) == pytest.approx(0.5, abs=1e-12)
    assert abs(SC.model_sampling_flux_shift(8100) - SC.empirical_mu(8100, 20)) < 1e-5
    assert torch.equal(SC.simple_schedule(4, 4096), SC.simple_schedule(4, 4096, SC.model_sampling_flux_shift(4096)))
    assert SC.simple_schedule(4, 4096).tolist() == COMFY_033_SIMPLE[(1.15, 4)]
    assert torch.equal(SC.build_sigmas("simple:1.829", 20, 24), SC.simple_schedule(20, 24, 1.829))
    assert torch.equal(SC.build_sigmas("simple", 20, 24, shift=1.829), SC.simple_schedule(20, 24, 1.829))
    # the native schedule is not the official one (1024², 20 steps: mu 2.198 vs 1.15)
    assert not torch.allclose(SC.build_sigmas("simple", 20, 4096), SC.build_sigmas("official", 20, 4096), atol=1e-2)


def test_no_schedule_within_the_limits_is_degenerate():
    """Every official schedule a request can ask for (1 … 1000 steps, 1 … 16384 tokens) passes check_sigmas;
    the native one too up to shift 5 (at shift 10 its 1000 steps repeat 1 − 1.2e-7 in float32: refused)."""
    for tokens in (1, 24, 256, 4096, 4300, 4301, 8100, 16384):
        for steps in range(1, 1001):
            SC.build_sigmas("official", steps, tokens)
    for tokens in (1, 4096, 16384):
        for steps in (1, 2, 20, 333, 1000):
            for shift in (None, 0.0, 1.829, 5.0):
                SC.build_sigmas("simple", steps, tokens, shift=shift)
    with pytest.raises(ValueError, match=r"expected strictly decreasing sigmas, found sigma\[1\] = 0.999999881 and "
                                         r"sigma\[2\] repeats"):
        SC.build_sigmas("simple:10", 1000, 4096)


# --- the sampler pieces ---------------------------------------------------------------------------------------


def golden(golden_dir, name):
    return load_file(str(golden_dir / "pipeline_tiny" / "cases" / f"{name}.fp32.safetensors"))


@pytest.mark.parametrize("name,steps,cfg", [("a_cfg1_4steps", 4, 1.0), ("b_cfg5_6steps_emptyneg", 6, 5.0)])
def test_sample_with_sigmas_equals_sample_with_steps(golden_dir, pipe_dit, name, steps, cfg):  # noqa: F811
    d = golden(golden_dir, name)
    feats = [d[f"prompt_embeds_{i}"] for i in range(4)]
    a = S.sample(pipe_dit, d["noise"], feats, d["prompt_mask"], grid=(4, 6), steps=steps, cfg=cfg)
    b = S.sample(pipe_dit, d["noise"], feats, d["prompt_mask"], grid=(4, 6), cfg=cfg,
                 sigmas=SC.build_sigmas("official", steps, 24))
    assert torch.equal(a, b)
    assert ((b - d["final_latents"]).norm() / d["final_latents"].norm()).item() <= 1e-5


class Recorder:
    """A stand-in DiT (v = x): records the batch rows, text length and timestep of every forward."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, feats, mask, t, grid):
        self.calls.append((x.shape[0], mask.shape[1], t.clone()))
        return x * 0.5


def test_sample_walks_the_given_sigmas():
    noise = S.make_noise(0, 1, 2, 3)
    feats, mask = [torch.zeros(1, 3, 8)] * 4, torch.ones(1, 3, dtype=torch.bool)
    sig = SC.build_sigmas("simple:1.829", 5, 6)
    rec, seen = Recorder(), []
    S.sample(rec, noise, feats, mask, grid=(2, 3), cfg=1.0, sigmas=sig, exact=False,
             callback=lambda i, n, lat, x0: seen.append((i, n)))
    assert [c[2].item() for c in rec.calls] == S.model_timesteps(sig, torch.float32).tolist()
    assert seen == [(i, 5) for i in range(5)]
    # a tail starting below 1 is img2img: the start mixes init and noise at sigmas[0]
    init = torch.full((1, 6, 128), 0.25)
    rec2 = Recorder()
    starts = []
    S.sample(lambda x, *a, **k: starts.append(x.clone()) or rec2(x, *a, **k), noise, feats, mask, grid=(2, 3),
             cfg=1.0, sigmas=sig[2:], init_latents=init, exact=False)
    assert torch.equal(starts[0], ((1 - sig[2]) * init + sig[2] * noise))
    assert len(rec2.calls) == 3


def test_sample_sigmas_errors():
    noise = S.make_noise(0, 1, 2, 3)
    feats, mask = [torch.zeros(1, 3, 8)] * 4, torch.ones(1, 3, dtype=torch.bool)
    sig = SC.build_sigmas("official", 4, 6)
    run = lambda **kw: S.sample(Recorder(), noise, feats, mask, grid=(2, 3), cfg=2.0, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="sample: sigmas replace steps and denoise"):
        run(sigmas=sig, steps=4)
    with pytest.raises(ValueError, match="sample: sigmas replace steps and denoise"):
        run(sigmas=sig, denoise=0.5)
    with pytest.raises(ValueError, match="sample: expected steps .* or sigmas"):
        run()
    with pytest.raises(ValueError, match=r"init_latents: denoise < 1 needs the clean latents of shape \(1, 6, 128\) "
                                         r"\(the schedule starts at sigma 0.\d+, below 1\), got None"):
        run(sigmas=sig[1:])
    with pytest.raises(ValueError, match=r"^sigmas: expected strictly decreasing sigmas"):
        run(sigmas=torch.tensor([1.0, 0.5, 0.5, 0.0]))


def test_guidance_modes():
    pos, pmask = [torch.randn(2, 3, 8) for _ in range(4)], torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    kw = dict(device="cpu", dtype=torch.float32)
    g = S.make_guidance(pos, pmask, cfg=1.0, exact=True, **kw)
    assert isinstance(g, S.BatchedCFG) and g.rows == 4 and g.exact and g.mask.shape == (4, 3)
    assert not g.mask[2:].any()                                   # the empty negative: all-False mask
    g = S.make_guidance(pos, pmask, cfg=1.0, exact=False, **kw)
    assert isinstance(g, S.PositiveOnly) and g.rows == 2 and g.mask.shape == (2, 2)   # padding column cropped
    g = S.make_guidance(pos, pmask, cfg=4.0, exact=False, **kw)
    assert isinstance(g, S.SplitCFG) and g.forwards == 2 and g.neg_mask.shape == (2, 0)
    rec = Recorder()
    v = g.velocity(rec, torch.ones(2, 4, 128), torch.tensor(0.5), (2, 2), {})
    assert [c[:2] for c in rec.calls] == [(2, 2), (2, 0)] and v.shape == (2, 4, 128)
    with pytest.raises(ValueError, match=r"neg_mask: expected \[B=2, S\] bool, got \(1, 3\)"):
        S.make_guidance(pos, pmask, pos, pmask[:1], cfg=4.0, **kw)


def test_inpainting_piece_keeps_the_outside():
    init, noise = torch.full((1, 4, 128), 0.3), S.make_noise(1, 1, 2, 2)
    m = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 4, 1)
    piece = S.Inpainting(m, init, noise, device="cpu")
    lat, x0 = piece(torch.ones(1, 4, 128), torch.ones(1, 4, 128), torch.tensor(0.0))
    assert torch.equal(lat[:, 1], init[:, 1]) and torch.equal(lat[:, 0], torch.ones(1, 128))
    assert torch.equal(x0[:, 3], init[:, 3])
    with pytest.raises(ValueError, match=r"mask: expected the packed mask \[1, 4, 1\]"):
        S.Inpainting(m[:, :2], init, noise, device="cpu")
    assert torch.equal(S.start_latents(noise, torch.tensor(1.0), None, dtype=torch.float32, device="cpu"), noise)


# --- pipeline and CLI ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe32(pipeline_dir):
    from lens_core.pipeline import LensPipeline

    return LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu")


def test_pipeline_schedule(pipe32):
    seen = []
    kw = dict(height=64, width=96, steps=3, cfg=1.0, seed=4)
    official = pipe32("a cube", **kw)
    simple = pipe32("a cube", schedule="simple:1.829", callback=lambda *a: seen.append(a[3].clone()), **kw)
    assert simple.parameters["schedule"] == "simple:1.829" and official.parameters["schedule"] == "official"
    assert len(seen) == 3 and not torch.equal(simple.latents, official.latents)
    # the same run by hand: the pipeline walks exactly the registry's sigmas
    feats, mask, _ = pipe32.encode(["a cube"], [""], 1, DEFAULT_TEMPLATE_DATE)
    by_hand = S.sample(pipe32.transformer, S.make_noise(4, 1, 4, 6), feats, mask, grid=(4, 6), cfg=1.0,
                       sigmas=SC.simple_schedule(3, 24, 1.829), exact=pipe32.exact, dtype=torch.float32)
    assert torch.equal(by_hand, simple.latents)
    with pytest.raises(ValueError, match="schedule: unknown schedule 'karras'"):
        pipe32("a cube", schedule="karras", **kw)


def test_cli_schedule_regenerates(pipeline_dir, tmp_path, capsys):
    from lens_core.__main__ import main

    out = tmp_path / "s.png"
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "a frog", "--height", "32", "--width", "48",
                 "--steps", "2", "--schedule", "simple", "--dtype", "fp32", "--out", str(out)]) == 0
    img = Image.open(out)
    meta = json.loads(img.text["lens"])
    assert meta["schedule"] == "simple" and ", Schedule: simple" in img.text["parameters"]
    argv = shlex.split(meta["command"])
    assert argv[argv.index("--schedule") + 1] == "simple"
    argv[argv.index("--out") + 1] = str(tmp_path / "again.png")
    assert main(argv[3:]) == 0
    assert Image.open(tmp_path / "again.png").tobytes() == img.tobytes()
    capsys.readouterr()
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "a frog", "--schedule", "simple:x",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "error: --schedule 'simple:x': expected simple:SHIFT with a number" in capsys.readouterr().err
