"""Smoke tests of the DiT benchmark modes at CI size (tiny config, CPU): the GPU-ready ``--full`` end-to-end
mode and the ``--official`` comparison harness. They check the plumbing and the printed figures' bookkeeping
(forward counts, FLOP floor columns, output agreement), never a timing."""
from __future__ import annotations

import textwrap

import pytest
import torch

from lens_core import bench


def test_dit_full_mode_smoke(capsys):
    assert bench.main(["--component", "dit", "--full", "--tiny", "--runs", "1", "--text-len", "8",
                       "--mode", "exact,fast", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "# device: cpu = " in out and "# load average at start" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("lens", "turbo"))]
    # Lens: 20 steps × 2 forwards in both modes; Turbo: 4 × 2 exact (the batch of 2), 4 × 1 fast
    forwards = [int(ln.split("|")[6]) for ln in lines]
    assert forwards == [40, 40, 8, 4], out
    assert "× FLOP floor" in out and "× paper H100" not in out  # paper ratio only for the real 48 blocks


OFFICIAL_STAND_IN = '''
import torch
from lens_core.config import LensDiTConfig
from lens_core.dit import LensTransformer

class LensTransformer2DModel(LensTransformer):
    """Stand-in with the official constructor and forward signature (the real file lives outside the repo)."""
    def __init__(self, num_layers=48, attention_head_dim=64, num_attention_heads=24, inner_dim=1536,
                 enc_hidden_dim=2880, axes_dims_rope=(8, 28, 28), **kw):
        super().__init__(LensDiTConfig(num_layers=num_layers, attention_head_dim=attention_head_dim,
                                       num_attention_heads=num_attention_heads, inner_dim=inner_dim,
                                       enc_hidden_dim=enc_hidden_dim, axes_dims_rope=axes_dims_rope))
    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes):
        _, h, w = img_shapes[0]
        return super().forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                               grid=(h, w), exact=True)
'''


def test_dit_official_comparison_harness(tmp_path, capsys):
    path = tmp_path / "transformer.py"
    path.write_text(textwrap.dedent(OFFICIAL_STAND_IN))
    assert bench.main(["--component", "dit", "--official", str(path), "--tiny", "--runs", "1",
                       "--text-len", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[0].strip(): ln for ln in out.splitlines() if ln.startswith(("forward", "lens", "turbo"))}
    assert set(rows) == {"forward", "lens", "turbo"}, out
    header = [c.strip() for c in next(ln for ln in out.splitlines() if ln.startswith("what")).split("|")]
    for what, ln in rows.items():
        cells = dict(zip(header, (c.strip() for c in ln.split("|"))))
        assert float(cells["exact maxdiff"]) == 0.0  # the stand-in is our exact path: identical outputs
        assert float(cells["fast maxdiff"]) <= 1e-5, (what, cells)


def test_dit_bench_argument_errors(tmp_path):
    with pytest.raises(OSError, match="expected the official transformer.py rebuild"):
        bench.main(["--component", "dit", "--official", str(tmp_path / "missing.py"), "--tiny", "--runs", "1"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            bench.main(["--component", "dit", "--device", "cuda", "--tiny", "--runs", "1"])


def test_enhance_bench_smoke(tmp_path, capsys):
    """The enhancer benchmark at its smallest: both sides generate the same greedy ids, every row has its rates
    and the per-round ratios (per-token time stamps from our callback and transformers' logits processor)."""
    assert bench.main(["--component", "enhance", "--size", "tiny", "--tokens", "12", "--new", "4", "--runs", "1",
                       "--rounds", "2", "--threads", "1", "--sides", "ours,transformers",
                       "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in out.splitlines()
            if ln.startswith(("ours", "transformers"))}
    assert set(rows) == {"ours", "transformers"}, out
    assert all(float(v) > 0 for v in rows["ours"][:2] + rows["transformers"][:2])
    assert float(rows["ours"][4]) > 0 and float(rows["ours"][5]) > 0 and rows["ours"][6] == "True", out
