"""Node-layer tests without ComfyUI: the pack's nodes against the comfy stand-in (tests/comfy_stub), which is
put on sys.path only when the real ``comfy`` package is not importable.

The full-graph test runs loaders -> LensTextEncode -> LensEmptyLatent -> LensSampler -> LensVAEDecode on the
tiny golden pipeline and compares the IMAGE with lens_core's own LensPipeline for the same seed and with the
golden reference image of the official pipeline (pipeline case a).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
STUB = REPO / "tests" / "comfy_stub"
PACK_NAME = "lens_nodes_pack"
PROMPT = "a red cube on a wooden table"

# Core node ids of ComfyUI (0.3.64 plus the native Lens nodes of 2026) a custom node must never reuse.
CORE_IDS = {"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "EmptyLatentImage",
            "KSampler", "KSamplerAdvanced", "SamplerCustom", "VAEDecode", "VAEEncode", "VAEDecodeTiled",
            "VAEEncodeTiled", "SaveImage", "PreviewImage", "LoadImage", "EmptySD3LatentImage",
            "EmptyFlux2LatentImage", "EmptyHunyuanLatent", "ModelSamplingFlux", "CFGNorm"}


def ensure_comfy():
    """Real comfy when importable, else the stand-in. Returns True when the stand-in is in use."""
    try:
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401
        return "comfy_stub" in str(pathlib.Path(sys.modules["comfy"].__file__))
    except ImportError:
        for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
            del sys.modules[name]
        sys.path.insert(0, str(STUB))
        import comfy.model_management  # noqa: F401
        return True


def import_pack():
    """The repository imported as a package, the way ComfyUI loads a custom-node folder."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    ensure_comfy()
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return import_pack()


@pytest.fixture(scope="module")
def stub_only(pack):
    import comfy
    if "comfy_stub" not in str(pathlib.Path(comfy.__file__)):
        pytest.skip("real ComfyUI importable: stand-in specific test")
    return True


# ---------------------------------------------------------------------------------------------------------
# definitions


def test_mappings_and_ids(pack):
    m = pack.NODE_CLASS_MAPPINGS
    assert set(m) == {"LensModelLoader", "LensTextEncoderLoader", "LensVAELoader", "LensCheckpointLoader",
                      "LensTextEncode", "LensEmptyLatent", "LensSampler", "LensVAEDecode", "LensVAEEncode"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(m)
    for name in m:
        assert name.startswith("Lens") and name not in CORE_IDS


@pytest.mark.parametrize("name", ["LensModelLoader", "LensTextEncoderLoader", "LensVAELoader",
                                  "LensCheckpointLoader", "LensTextEncode", "LensEmptyLatent", "LensSampler",
                                  "LensVAEDecode", "LensVAEEncode"])
def test_input_and_return_types_valid(pack, name):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in ("required", "optional"):
        for inp, s in spec.get(section, {}).items():
            assert isinstance(s, tuple) and 1 <= len(s) <= 2, (inp, s)
            t = s[0]
            assert isinstance(t, list) and t or isinstance(t, str) and t, (inp, t)
            opts = s[1]
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, (name, inp)
            if isinstance(t, list) and "default" in opts:
                assert opts["default"] in t
            if t in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"]
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(r, str) for r in cls.RETURN_TYPES)
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attr):
            assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY.startswith("Lens/")
    # every required/optional input is an argument of FUNCTION
    import inspect
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for section in ("required", "optional", "hidden"):
        for inp in spec.get(section, {}):
            assert inp in params, (name, inp)


def test_custom_types_chain(pack):
    m = pack.NODE_CLASS_MAPPINGS
    assert m["LensModelLoader"].RETURN_TYPES == ("LENS_MODEL",)
    assert m["LensCheckpointLoader"].RETURN_TYPES == ("LENS_MODEL", "LENS_TEXT_ENCODER", "LENS_VAE")
    assert m["LensTextEncode"].RETURN_TYPES == ("CONDITIONING",)
    assert m["LensSampler"].INPUT_TYPES()["required"]["model"][0] == "LENS_MODEL"
    assert m["LensVAEDecode"].RETURN_TYPES == ("IMAGE",)
    assert m["LensVAEEncode"].RETURN_TYPES == ("LATENT",)
