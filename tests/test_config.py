"""lens_core.config: the transformer config, variants, buckets, size validation and latent packing."""
from __future__ import annotations

import json

import pytest
import torch

from lens_core import config as C


def test_real_config_fields():
    cfg = C.REAL_DIT_CONFIG
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (48, 24, 64)
    assert cfg.width == 1536 and cfg.mlp_hidden == 4096 and cfg.out_features == 128
    assert cfg.enc_hidden_dim == 2880 and cfg.selected_layer_index == (5, 11, 17, 23)
    assert cfg.axes_dims_rope == (8, 28, 28)


def test_from_json_tiny(golden_dir):
    cfg = C.LensDiTConfig.from_json(golden_dir / "dit_tiny" / "transformer" / "config.json")
    assert cfg.num_layers == 2 and cfg.width == 128 and cfg.mlp_hidden == 341 and cfg.enc_hidden_dim == 64
    assert cfg.selected_layer_index == (0, 1, 2, 3)
    assert C.LensDiTConfig.from_dict(cfg.to_dict()) == cfg
    pipe = C.LensDiTConfig.from_json(golden_dir / "pipeline_tiny" / "transformer" / "config.json")
    assert pipe.selected_layer_index == (1, 3, 4, 5)


def test_config_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        C.LensDiTConfig.from_json(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        C.LensDiTConfig.from_json(bad)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        C.LensDiTConfig(axes_dims_rope=(8, 28, 30))
    with pytest.raises(ValueError, match="gate_mlp"):
        C.LensDiTConfig(gate_mlp=False)


def test_variants():
    assert C.variant_defaults("lens") == (20, 5.0)
    assert C.variant_defaults("turbo") == (4, 1.0)
    assert C.variant_defaults("Lens-Turbo") == (4, 1.0)
    assert C.variant_defaults("base") == (50, 5.0)
    with pytest.raises(ValueError, match="unknown Lens variant 'flux'.*expected"):
        C.variant_defaults("flux")


def test_buckets():
    b1024 = C.aspect_buckets(1024)
    b1440 = C.aspect_buckets(1440)
    assert list(b1024) == list(C.ASPECT_LABELS) == list(b1440)
    assert b1024["1:1"] == (1024, 1024) and b1024["16:9"] == (768, 1376) and b1024["1:2"] == (1472, 736)
    assert b1440["2:3"] == (1760, 1168) and b1440["2:1"] == (1040, 2080)
    for label, (h, w) in b1024.items():
        assert C.validate_size(h, w) == (h // 16, w // 16)
        assert (h // 16) * (w // 16) <= 4300  # spec §5: mu depends on the step count
        a, b = label.split(":")
        assert b1024[f"{b}:{a}"] == (w, h)
    for h, w in b1440.values():
        assert (h // 16) * (w // 16) > 4300
    assert C.bucket_size(1440, "9:16") == (1936, 1088)
    with pytest.raises(ValueError, match="expected one of"):
        C.aspect_buckets(512)
    with pytest.raises(ValueError, match="aspect ratio"):
        C.bucket_size(1024, "5:4")


def test_validate_size():
    assert C.validate_size(64, 96) == (4, 6)
    for h, w in ((1000, 1024), (1024, 1030), (0, 16), (-16, 16), (16.0, 16)):
        with pytest.raises(ValueError, match="multiple of 16.*got"):
            C.validate_size(h, w)


def test_pack_matches_official_patchify():
    # official: latents [B,32,H/8,W/8] -> "b c (h p1) (w p2) -> b (h w) (c p1 p2)"; ComfyUI LATENT is the
    # 128-channel [B, c*4+p1*2+p2, h, w] layout of the same values.
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 32, 3, 5
    z = torch.randn(b, c, 2 * h, 2 * w, generator=g)
    ref = torch.empty(b, h * w, c * 4)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                for p1 in range(2):
                    for p2 in range(2):
                        ref[:, y * w + x, ch * 4 + p1 * 2 + p2] = z[:, ch, 2 * y + p1, 2 * x + p2]
    comfy = z.reshape(b, c, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h, w)
    tokens = C.pack_latents(comfy)
    assert torch.equal(tokens, ref)
    assert torch.equal(C.unpack_latents(tokens, h, w), comfy)
    with pytest.raises(ValueError, match="expected tokens"):
        C.unpack_latents(tokens, h + 1, w)
    with pytest.raises(ValueError, match="expected a"):
        C.pack_latents(tokens)
