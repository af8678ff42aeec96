"""Hostile and careless input to the file / config / node side (issue 12): every case asserts the exact outcome.

Kinds (the README table "What the pack refuses"): 1 a file that shrinks while it is read (child process: the
parent sees its exit code, so a SIGBUS would show as -7); 2 safetensors headers that lie (compared with the
reference ``safetensors`` library: whatever it refuses, we refuse); 3 shard paths that leave the model folder;
4 configs asking for absurd sizes (child process under a memory and a time limit); 5 the variant from the file's
own evidence, NaN in configs / BN statistics / node inputs; 6 clean errors instead of tracebacks; 8 folder
listing with symlink loops. The CLI / API argument side is tests/test_hostile_cli.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures as fx
from lens_core import checkpoints as ck
from lens_core.checkpoints.safetensors import SafetensorsFile

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_raw(path, header, data: bytes = b"", length: int | None = None) -> pathlib.Path:
    """A safetensors-shaped file with exactly the given header (dict or raw bytes) and data bytes."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = pathlib.Path(path)
    path.write_bytes((len(hb) if length is None else length).to_bytes(8, "little") + hb + data)
    return path


VALID = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}
DATA = torch.arange(5, dtype=torch.float32).numpy().tobytes()


def ours(path):
    """Open and read every tensor with our reader."""
    f = SafetensorsFile(path)
    try:
        return {k: f.read(k) for k in f.entries}
    finally:
        f.close()


def reference_refuses(path) -> bool:
    try:
        load_file(str(path))
        return False
    except Exception:
        return True


# --------------------------------------------------------------------------------------- 2: lying headers
LIES = {
    # name: (header, data, key words of our message)
    "offsets into the header": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, b"",
                                ["non-negative integers"]),
    "overlap": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                 "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}, DATA, ["overlaps"]),
    "gap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, DATA, ["gap"]),
    "size is not dtype x shape": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 20]}}, DATA,
                                  ["expected 16 bytes", "give 20"]),
    "end before begin": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [20, 0]}}, DATA, ["expected 0"]),
    "trailing bytes": (VALID, DATA + b"\0" * 8, ["8 bytes more"]),
    "truncated data": (VALID, DATA[:12], ["truncated"]),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16,
                      ["expected a dtype"]),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-1, -5], "data_offsets": [0, 20]}}, DATA,
                     ["non-negative integers"]),
    "float dim": ({"a": {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 20]}}, DATA,
                  ["non-negative integers"]),
    "offsets not a pair": ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20, 40]}}, DATA,
                           ["data_offsets [begin, end]"]),
    "metadata not strings": ({"__metadata__": {"format": 1}, **VALID}, DATA, ["strings to strings"]),
    "entry not an object": ({"a": [1, 2, 3]}, b"", ["expected an object"]),
    "header is a list": (b"[1, 2]", b"", ["starting with '{'"]),
    "not UTF-8": (b"{\"\xff\xfe\": 1}", b"", ["UTF-8 JSON"]),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_headers_are_refused_like_the_reference(tmp_path, case):
    header, data, words = LIES[case]
    path = write_raw(tmp_path / "x.safetensors", header, data)
    assert reference_refuses(path), "the reference library accepts this file: not a lie"
    with pytest.raises(ck.CheckpointError) as exc:
        ours(path)
    msg = str(exc.value)
    assert str(path) in msg and all(w in msg for w in words), msg


def test_header_edge_cases(tmp_path):
    # a valid file reads like the reference
    path = write_raw(tmp_path / "ok.safetensors", VALID, DATA)
    got, ref = ours(path), load_file(str(path))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # a key given twice (ambiguous: the reference keeps one of them silently) is refused
    dup = b'{"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]}, ' \
          b'"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]}}'
    with pytest.raises(ck.CheckpointError, match="appears twice"):
        ours(write_raw(tmp_path / "dup.safetensors", dup, DATA))
    # header length above the reference's 100 MB limit, and a length longer than the file
    with pytest.raises(ck.CheckpointError, match="at most 100000000 bytes"):
        ours(write_raw(tmp_path / "huge.safetensors", b"{}", b"", length=100_000_001))
    with pytest.raises(ck.CheckpointError, match="truncated or not safetensors"):
        ours(write_raw(tmp_path / "long.safetensors", b"{}", b"", length=5000))
    # JSON nested deeper than the parser's recursion limit: an error, not a RecursionError traceback
    with pytest.raises(ck.CheckpointError, match="UTF-8 JSON"):
        ours(write_raw(tmp_path / "deep.safetensors", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))


def test_mutated_headers_never_accepted_where_the_reference_refuses(tmp_path):
    """300 random lies in a valid header: every file the reference library refuses, we refuse with a
    CheckpointError (never another exception), and we never read a byte outside the data section."""
    rng = random.Random(12)
    pool = [-1, 0, 1, 7, 8, 12, 19, 20, 21, 2 ** 64, 2.0, "8", None, True, [], [8], [0, 8, 9]]
    refused_by_reference = 0
    for i in range(300):
        header = json.loads(json.dumps(VALID))
        for _ in range(rng.randint(1, 3)):
            entry = header[rng.choice(["a", "b"])]
            field = rng.choice(["dtype", "shape", "data_offsets", "offset0", "offset1", "dim"])
            if field == "dtype":
                entry["dtype"] = rng.choice(["F16", "BF16", "I64", "U8", "F64", "X", 3])
            elif field in ("offset0", "offset1"):
                offsets = entry["data_offsets"]
                offsets = list(offsets) if isinstance(offsets, list) and len(offsets) == 2 else [0, 0]
                offsets[field == "offset1"] = rng.choice(pool)
                entry["data_offsets"] = offsets
            elif field == "dim":
                entry["shape"] = [rng.choice(pool) for _ in range(rng.randint(0, 3))]
            else:
                entry[field] = rng.choice(pool)
        path = write_raw(tmp_path / f"m{i}.safetensors", header, DATA)
        ref_refuses = reference_refuses(path)
        refused_by_reference += ref_refuses
        try:
            got = ours(path)
        except ck.CheckpointError:
            continue
        assert not ref_refuses, f"accepted a header the reference refuses: {header}"
        assert sum(t.numel() * t.element_size() for t in got.values()) <= len(DATA)
    assert refused_by_reference > 150


# --------------------------------------------------------------------------------------- 1: shrinking file
SHRINK_CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "mmap-control":   # what a memory-mapped reader does in the same situation: the process dies
    import mmap
    path = sys.argv[3]
    f = open(path, "rb"); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.truncate(path, 4096)
    print(sum(m[i] for i in range(8192, len(m), 4096))); sys.exit(0)
import torch
from lens_core import checkpoints as ck
from lens_core.checkpoints import safetensors as st
original = st.SafetensorsFile.read
out = {}
for mode, path in json.loads(sys.argv[2]).items():
    calls = {"n": 0}
    def read(self, name, dtype=None, device=None, mode=mode, calls=calls):
        calls["n"] += 1
        if calls["n"] == 5:     # part of the way through the load, the file loses its tail
            os.truncate(self.path, self.size // 2 if mode == "half" else 0)
        return original(self, name, dtype, device)
    st.SafetensorsFile.read = read
    try:
        if mode == "before-read":   # shrinks between the header check and the first tensor read
            f = st.SafetensorsFile(path)
            os.truncate(path, f.size - 64)
            original(f, next(iter(f.entries)))
        else:
            ck.load_transformer(path, dtype=torch.float32)
        out[mode] = ["loaded", ""]
    except ck.CheckpointError as exc:
        out[mode] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


def test_file_shrinking_while_read_is_an_error_not_sigbus(tmp_path, golden_dir):
    paths = {mode: str(fx.write_comfy_dit_bf16(tmp_path / mode / "lens_bf16.safetensors", golden_dir))
             for mode in ("half", "zero", "before-read")}
    run = subprocess.run([sys.executable, "-c", SHRINK_CHILD, str(REPO), json.dumps(paths)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"child died with {run.returncode} (-{int(signal.SIGBUS)} = SIGBUS): {run.stderr}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for mode, path in paths.items():
        kind, msg = out[mode]
        assert kind == "CheckpointError", (mode, kind)
        assert path in msg and "changed while it was being read" in msg, (mode, msg)


def test_shrink_harness_detects_sigbus(tmp_path):
    """Control: the same child harness reports the SIGBUS a memory-mapped read of a shrunk file gets."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"\1" * (1 << 20))
    run = subprocess.run([sys.executable, "-c", SHRINK_CHILD, str(REPO), "mmap-control", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGBUS


# --------------------------------------------------------------------------------------- 3: paths escape
def _index(folder, weight_map):
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / "diffusion_pytorch_model.safetensors.index.json"


def test_shard_paths_must_stay_inside_the_index_folder(tmp_path):
    secret = write_raw(tmp_path / "outside.safetensors", VALID, DATA)
    folder = tmp_path / "models" / "transformer"
    folder.mkdir(parents=True)
    for name in ("../../outside.safetensors", str(secret)):
        idx = _index(folder, {"a": name, "b": name})
        with pytest.raises(ck.CheckpointError, match="outside the index's folder") as exc:
            ck.open_source(idx)
        assert str(idx) in str(exc.value)
    # a link inside the folder that leads out of it
    os.symlink(secret, folder / "linked.safetensors")
    with pytest.raises(ck.CheckpointError, match="outside the index's folder"):
        ck.open_source(_index(folder, {"a": "linked.safetensors"}))
    with pytest.raises(ck.CheckpointError, match="ending in .safetensors"):
        ck.open_source(_index(folder, {"a": "/etc/passwd"}))
    # the Hugging Face cache layout (snapshot files are links into the repository's blobs/) stays accepted
    repo = tmp_path / "hub" / "models--microsoft--Lens"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc" / "transformer"
    snap.mkdir(parents=True)
    write_raw(repo / "blobs" / "f00d", VALID, DATA)
    os.symlink(repo / "blobs" / "f00d", snap / "shard-1.safetensors")
    src = ck.open_source(_index(snap, {"a": "shard-1.safetensors", "b": "shard-1.safetensors"}))
    assert sorted(src.keys()) == ["a", "b"] and torch.equal(src.read("b"), load_file(str(repo / "blobs" / "f00d"))["b"])
    src.close()


# --------------------------------------------------------------------------------------- 4: absurd configs
LIMITS_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from lens_core import checkpoints as ck
cases = json.load(open(sys.argv[2]))
vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")][0] * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))   # 2 GB above what is mapped now
out = {}
for name, (component, path) in cases.items():
    load = {"transformer": ck.load_transformer, "text_encoder": ck.load_text_encoder, "vae": ck.load_vae}[component]
    try:
        load(path, dtype=torch.float32)
        out[name] = ["loaded", ""]
    except Exception as exc:
        out[name] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""

CONFIG_CASES = {
    # name: (component, changes to config.json, key words)
    "dit 10^9 layers": ("transformer", {"num_layers": 10 ** 9}, ["num_layers", "[1, 128]"]),
    "dit 10^6 heads": ("transformer", {"num_attention_heads": 10 ** 6}, ["num_attention_heads"]),
    "dit 10^8 text width": ("transformer", {"enc_hidden_dim": 10 ** 8}, ["enc_hidden_dim"]),
    "dit fractional heads": ("transformer", {"num_attention_heads": 2.5}, ["an integer", "2.5"]),
    "dit zero layers": ("transformer", {"num_layers": 0}, ["num_layers", "found 0"]),
    "dit string layers": ("transformer", {"num_layers": "2"}, ["an integer", "'2'"]),
    "dit more layers than the file": ("transformer", {"num_layers": 48}, ["num_layers=48", "holds 2"]),
    "dit wider than the file": ("transformer", {"num_attention_heads": 24}, ["img_in.weight", "[1536, 128]"]),
    "dit rope axes": ("transformer", {"axes_dims_rope": [8, 28, 10 ** 9]}, ["axes_dims_rope"]),
    "te 10^9 layers": ("text_encoder", {"num_hidden_layers": 10 ** 9}, ["num_hidden_layers"]),
    "te 10^7 hidden": ("text_encoder", {"hidden_size": 10 ** 7}, ["hidden_size"]),
    "te 10^6 experts": ("text_encoder", {"num_local_experts": 10 ** 6}, ["num_local_experts"]),
    "te 10^9 vocab": ("text_encoder", {"vocab_size": 10 ** 9}, ["vocab_size"]),
    "te zero heads": ("text_encoder", {"num_attention_heads": 0, "head_dim": 64}, ["num_attention_heads"]),
    "te NaN eps": ("text_encoder", {"rms_norm_eps": float("nan")}, ["rms_norm_eps", "finite"]),
    "te inf rope theta": ("text_encoder", {"rope_parameters": {"rope_type": "yarn", "rope_theta": float("inf"),
                                                               "factor": 32.0, "original_max_position_embeddings":
                                                               4096}}, ["rope_theta", "finite"]),
    "te layers beyond the file": ("text_encoder", {"num_hidden_layers": 24, "layer_types": None},
                                  ["num_hidden_layers=24", "holds 6"]),
    "vae 10^6 channels": ("vae", {"block_out_channels": [10 ** 6] * 4}, ["block_out_channels"]),
    "vae 10^6 layers per block": ("vae", {"layers_per_block": 10 ** 6}, ["layers_per_block"]),
    "vae NaN eps": ("vae", {"batch_norm_eps": float("nan")}, ["batch_norm_eps", "finite"]),
    "vae other widths than the file": ("vae", {"block_out_channels": [32, 64, 64, 128]},
                                       ["block_out_channels=(32, 64, 64, 128)", "(16, 32, 32, 64)"]),
}


def _component_copy(golden_dir, dst, component, changes):
    shutil.copytree(golden_dir / "pipeline_tiny" / component, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    cfg_path.write_text(json.dumps(cfg))          # json writes NaN / Infinity literals, as a hostile file can
    return dst


def test_absurd_configs_refused_before_building_under_limits(tmp_path, golden_dir):
    cases = {}
    for i, (name, (component, changes, _)) in enumerate(CONFIG_CASES.items()):
        cases[name] = (component, str(_component_copy(golden_dir, tmp_path / f"c{i}" / component, component,
                                                       changes)))
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    run = subprocess.run([sys.executable, "-c", LIMITS_CHILD, str(REPO), str(spec)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (_c, _ch, words) in CONFIG_CASES.items():
        kind, msg = out[name]
        assert kind == "CheckpointError", (name, kind, msg)
        assert "config.json" in msg and all(w in msg for w in words), (name, msg)


def test_config_files_that_are_not_configs(tmp_path, golden_dir):
    folder = _component_copy(golden_dir, tmp_path / "transformer", "transformer", {})
    for raw, words in ((b"\xff\xfe{}", ["invalid JSON"]), (b"[1, 2]", ["JSON object", "list"]),
                       (b"{" * 10 ** 6, ["invalid JSON"])):
        (folder / "config.json").write_bytes(raw)
        with pytest.raises(ck.CheckpointError) as exc:
            ck.load_transformer(folder, dtype=torch.float32)
        assert "config.json" in str(exc.value) and all(w in str(exc.value) for w in words), str(exc.value)


def test_single_file_shapes_that_lie(tmp_path, golden_dir):
    """No config.json: the config comes from the shapes, which are checked like config values."""
    sd = fx.dit_state_dict(golden_dir)
    sd["img_in.weight"] = torch.zeros(128)                     # a 1-D "matrix"
    save_file(sd, str(tmp_path / "flat.safetensors"))
    with pytest.raises(ck.CheckpointError, match=r"img_in.weight.*2 non-zero dimensions"):
        ck.load_transformer(tmp_path / "flat.safetensors", dtype=torch.float32)
    sd = fx.dit_state_dict(golden_dir)
    sd["transformer_blocks.0.img_mlp.w1.weight"] = torch.zeros(341, 129)
    save_file(sd, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ck.CheckpointError, match=r"img_mlp.w1.weight.*\[341, 128\].*\[341, 129\]"):
        ck.load_transformer(tmp_path / "wide.safetensors", dtype=torch.float32)
    sd = fx.dit_state_dict(golden_dir)
    sd["txt_in.weight"] = sd["txt_in.weight"].to(torch.int32)   # integers where floats belong
    save_file(sd, str(tmp_path / "ints.safetensors"))
    with pytest.raises(ck.CheckpointError, match="txt_in.weight.*is I32, expected a float type"):
        ck.load_transformer(tmp_path / "ints.safetensors", dtype=torch.float32)


# --------------------------------------------------------------------------------------- 5: evidence, NaN
def test_variant_comes_from_the_file_before_its_folder(tmp_path, golden_dir, monkeypatch):
    folder = tmp_path / "Lens-Turbo"
    folder.mkdir()
    sd = {k: v.to(torch.bfloat16) for k, v in fx.dit_state_dict(golden_dir).items()}
    save_file(sd, str(folder / "lens_bf16.safetensors"), metadata={"format": "pt", "modelspec.title": "Lens-Base"})
    model = ck.load_transformer(folder / "lens_bf16.safetensors", dtype=torch.float32)
    assert (model.lens_checkpoint.variant, model.lens_checkpoint.variant_source) == ("base", "metadata/config")
    # without evidence in the file, the folder name decides
    save_file(sd, str(folder / "plain.safetensors"), metadata={"format": "pt"})
    assert ck.load_transformer(folder / "plain.safetensors", dtype=torch.float32).lens_checkpoint.variant == "turbo"
    # the ComfyUI loader node uses the same decision (its sampler defaults follow it)
    from test_nodes import import_pack
    loaders = sys.modules[import_pack().__name__ + ".nodes.loaders"]
    assert loaders.load_model(str(folder / "lens_bf16.safetensors")).variant == "base"


def test_vae_with_nan_bn_statistics(tmp_path, golden_dir):
    sd = fx.vae_state_dict(golden_dir)
    sd["bn.running_var"] = sd["bn.running_var"].clone()
    sd["bn.running_var"][3] = float("nan")
    save_file(sd, str(tmp_path / "flux2-vae.safetensors"))
    with pytest.raises(ck.CheckpointError, match="bn.running_var.*finite values >= 0.*corrupt"):
        ck.load_vae(tmp_path / "flux2-vae.safetensors")


def test_nan_inputs_stop_the_lens_nodes():
    from test_nodes import import_pack
    nodes = import_pack().NODE_CLASS_MAPPINGS
    nan_latent = torch.zeros(1, 128, 4, 4)
    nan_latent[0, 5, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"LensVAEDecode: latent: expected finite numbers, found 1 non-finite"):
        nodes["LensVAEDecode"]().decode(None, {"samples": nan_latent})
    image = torch.rand(1, 32, 32, 3)
    image[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"LensVAEEncode: pixels: expected finite.*0 NaN, 1 inf.*Fix"):
        nodes["LensVAEEncode"]().encode(None, image)
    bridge = sys.modules[import_pack().__name__ + ".nodes.bridge"]
    from lens_core.config import REAL_DIT_CONFIG
    model = bridge.LensModel(patcher=None, config=REAL_DIT_CONFIG, variant="lens", dtype=torch.float32, path="x")
    cond = [[torch.zeros(1, 3, 256), {"attention_mask": torch.ones(1, 3)}]]
    with pytest.raises(ValueError, match="LensSampler: latent: expected finite"):
        nodes["LensSampler"]().sample(model, cond, cond, {"samples": nan_latent}, 0, 4, 1.0, 1.0)
    bad = [[torch.full((1, 3, 256), float("nan")), {"attention_mask": torch.ones(1, 3)}]]
    with pytest.raises(ValueError, match="positive conditioning: expected finite.*LensTextEncode"):
        nodes["LensSampler"]().sample(model, bad, cond, {"samples": torch.zeros(1, 128, 4, 4)}, 0, 4, 1.0, 1.0)


# --------------------------------------------------------------------------------------- 6: clean errors
def test_foreign_and_broken_files_get_named(tmp_path, golden_dir):
    names = ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight",
             "first_stage_model.encoder.down.0.block.0.conv1.weight",
             "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    sdxl = {n: torch.zeros(1) for n in names}
    save_file(sdxl, str(tmp_path / "sd_xl_base_1.0.safetensors"))
    with pytest.raises(ck.CheckpointError) as exc:
        ck.load_vae(tmp_path / "sd_xl_base_1.0.safetensors")
    assert "SDXL UNet checkpoint (a full checkpoint" in str(exc.value)
    assert not str(exc.value).split("looks like ")[1].startswith("a VAE")
    # a text encoder file whose embedded tokenizer is not UTF-8
    path = fx.write_comfy_te_nvfp4(tmp_path / "te.safetensors", golden_dir, None, embed_tokenizer=False)
    sd = load_file(str(path))
    sd["tokenizer_json"] = torch.tensor(list(b"{\"\xff\xfe\"}"), dtype=torch.uint8)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="expected UTF-8 tokenizer.json content.*download it again"):
        ck.load_tokenizer(path)
    # a quantization marker that is not a small JSON text
    sd = {k: v.to(torch.bfloat16) for k, v in fx.dit_state_dict(golden_dir).items()}
    sd["img_in.comfy_quant"] = torch.zeros(2, 2, dtype=torch.float32)
    save_file(sd, str(tmp_path / "marker.safetensors"))
    with pytest.raises(ck.CheckpointError, match="img_in.comfy_quant.*1-D U8 JSON quantization marker"):
        ck.load_transformer(tmp_path / "marker.safetensors", dtype=torch.float32)
    sd.pop("img_in.comfy_quant")
    save_file(sd, str(tmp_path / "qmeta.safetensors"), metadata={"_quantization_metadata": "[1, 2]"})
    with pytest.raises(ck.CheckpointError, match="unreadable _quantization_metadata"):
        ck.load_transformer(tmp_path / "qmeta.safetensors", dtype=torch.float32)


# --------------------------------------------------------------------------------------- 8: symlink loops
def test_folder_listing_terminates_on_symlink_loops(tmp_path):
    from test_nodes import import_pack
    pack = import_pack()
    bridge = sys.modules[pack.__name__ + ".nodes.bridge"]
    import folder_paths
    if not hasattr(folder_paths, "set_models_dir"):
        pytest.skip("real ComfyUI importable: its folder_paths is not redirected here")
    root = tmp_path / "models" / "diffusion_models"
    (root / "a" / "b").mkdir(parents=True)
    write_raw(root / "lens_bf16.safetensors", VALID, DATA)
    write_raw(root / "a" / "b" / "deep.safetensors", VALID, DATA)
    # several loops per folder: a plain os.walk(followlinks=True) visits 3^40 paths before ELOOP stops it
    for link, target in (("self", root), ("up", root), ("a/b/loop", root / "a"), ("a/b/root", root),
                         ("a/back", root / "a")):
        os.symlink(target, root / link)
    folder_paths.set_models_dir(tmp_path / "models")
    result = {}
    worker = threading.Thread(target=lambda: result.update(choices=bridge.model_choices("diffusion_models")),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "folder listing did not terminate"
    assert result["choices"] == ["a/b/deep.safetensors", "lens_bf16.safetensors"]
