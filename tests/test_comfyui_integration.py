"""lens-nodes inside a real ComfyUI, driven over its HTTP + websocket API (marked ``comfyui``; skipped unless
COMFYUI_DIR points at a ComfyUI set up with ../shared/tools/comfyui_headless.sh).

The server runs with a temporary --base-directory (so output/, user/, temp/ never land in the ComfyUI
checkout), an extra_model_paths.yaml whose ``custom_nodes`` entry holds a symlink ``lens-nodes`` -> this
repository and whose model folders hold the tiny golden pipeline, and ``--preview-method auto``.
A free port of 18188-18299 on 127.0.0.1 (checked to answer with this server's own --base-directory); the
server is stopped by PID at the end.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import comfyui_dir_or_skip
from test_workflows import check_workflow, ui_to_api

pytestmark = pytest.mark.comfyui

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = (REPO.parent / "shared" / "tools" / "comfyui_headless.sh").resolve()
PORTS = range(18188, 18300)


def _registered_nodes() -> set:
    """The node ids nodes/__init__.py registers (read from its NODE_CLASS_MAPPINGS literal)."""
    import ast

    tree = ast.parse((REPO / "nodes" / "__init__.py").read_text())
    (mapping,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "NODE_CLASS_MAPPINGS"]
    return {k.value for k in mapping.keys}


LENS_NODES = _registered_nodes()
TINY = "Lens-tiny"
UPSCALER = "tiny-compact-4x.safetensors"


def _write_dits(folder, golden_dir):
    """Comfy-Org style single files: ``lens_bf16.safetensors`` (the tiny pipeline DiT in bf16, the name the
    workflows use) and ``lens-narrow-text_bf16.safetensors``, a Lens-layout DiT whose text input is 4×32 wide
    (a model another text encoder's conditioning does not fit)."""
    import torch
    from fixtures import dit_state_dict, write_comfy_dit_bf16
    from safetensors.torch import save_file

    write_comfy_dit_bf16(folder / "lens_bf16.safetensors", golden_dir, which="pipeline")
    sd = {k: v.to(torch.bfloat16) for k, v in dit_state_dict(golden_dir, "pipeline").items()}
    for i in range(4):
        sd[f"txt_norm.{i}.weight"] = sd[f"txt_norm.{i}.weight"][:32].contiguous()
    sd["txt_in.weight"] = sd["txt_in.weight"].reshape(128, 4, 64)[:, :, :32].reshape(128, 128).contiguous()
    save_file(sd, str(folder / "lens-narrow-text_bf16.safetensors"))


GGUF_DIT, GGUF_TE = "lens-tiny-Q8_0.gguf", "gguf-tiny/gpt-oss-tiny.gguf"


def _write_ggufs(models, golden_dir, pipeline_dir):
    """GGUF files (issue 15): the tiny pipeline DiT as a stable-diffusion.cpp Q8_0 GGUF in diffusion_models, and
    the tiny GPT-OSS as an unsloth-style GGUF in text_encoders/gguf-tiny/ with tokenizer.json beside it (plus the
    pipeline's transformer/config.json there, which is where the loader finds the tiny layer selection)."""
    import shutil

    from fixtures import write_gguf_dit, write_gguf_te

    write_gguf_dit(models / "diffusion_models" / GGUF_DIT, golden_dir, "Q8_0", which="pipeline")
    te = models / "text_encoders" / GGUF_TE
    (te.parent / "transformer").mkdir(parents=True)
    write_gguf_te(te, golden_dir)
    shutil.copy(pipeline_dir / "tokenizer" / "tokenizer.json", te.parent / "tokenizer.json")
    shutil.copy(pipeline_dir / "transformer" / "config.json", te.parent / "transformer" / "config.json")


def _write_tiny_upscaler(path):
    """A 4× RealESRGAN-Compact upscale model (4 features, no inner convs) that ComfyUI's loader recognises."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"body.0.weight": torch.randn(4, 3, 3, 3, generator=g) * 0.2, "body.0.bias": torch.zeros(4),
               "body.1.weight": torch.full((4,), 0.25),
               "body.2.weight": torch.randn(48, 4, 3, 3, generator=g) * 0.2, "body.2.bias": torch.full((48,), 0.5)},
              str(path))


# ---------------------------------------------------------------------------------------------------------
# a minimal websocket client (RFC 6455, stdlib only): collects ComfyUI's JSON events and binary previews


class EventStream:
    def __init__(self, port: int, client_id: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(4096)
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.sock.settimeout(None)
        self.events = []            # ("json", dict) or ("binary", event_type)
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + data)

    def _loop(self):
        try:
            while True:
                b1, b2 = self._read(2)
                opcode, length = b1 & 0x0F, b2 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read(8))[0]
                payload = self._read(length)
                if opcode == 0x9:
                    self._send(0xA, payload[:125])
                    continue
                if opcode == 0x8:
                    break
                with self.cond:
                    if opcode == 0x1:
                        self.events.append(("json", json.loads(payload)))
                    elif opcode == 0x2:
                        self.events.append(("binary", struct.unpack(">I", payload[:4])[0]))
                    self.cond.notify_all()
        except (OSError, ConnectionError):
            pass
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def wait_for(self, predicate, timeout=300.0):
        """Wait until ``predicate(event)`` holds for some JSON event; returns it."""
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for kind, ev in self.events:
                    if kind == "json" and predicate(ev):
                        return ev
                left = deadline - time.time()
                if left <= 0 or self.closed:
                    raise TimeoutError(f"no matching websocket event; got {[e for k, e in self.events if k == 'json'][-5:]}")
                self.cond.wait(left)

    def for_prompt(self, prompt_id):
        """Events of one prompt: JSON events carrying its prompt_id plus the binary frames between them."""
        with self.cond:
            out, inside = [], False
            for kind, ev in self.events:
                if kind == "json":
                    inside = ev.get("data", {}).get("prompt_id") == prompt_id
                    if inside:
                        out.append((kind, ev))
                elif inside:
                    out.append((kind, ev))
            return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------
# server fixture


def _free_port(exclude=()):
    """A free port of PORTS, tried in a random order: several sessions may start ComfyUI servers at once."""
    import random

    for port in random.sample(list(PORTS), len(PORTS)):
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def _is_our_server(port, base) -> bool:
    """Whether the ComfyUI answering on ``port`` is the one started with ``--base-directory base`` (another
    session's server may have taken the port between the check and the start)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=30) as r:
            argv = json.loads(r.read())["system"]["argv"]
    except (OSError, ValueError, KeyError):
        return False
    return str(base) in argv


class Server:
    def __init__(self, port, pid, base, log):
        self.port, self.pid, self.base, self.log = port, pid, base, log
        self.client_id = uuid.uuid4().hex
        self.ws = EventStream(port, self.client_id)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path):
        with urllib.request.urlopen(self.url(path), timeout=60) as r:
            return json.loads(r.read())

    def post(self, path, body):
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def submit(self, prompt):
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, body
        return body["prompt_id"]

    def finish(self, prompt_id, timeout=300):
        """Wait for the end of a prompt; returns (status event type, history entry)."""
        ev = self.ws.wait_for(lambda e: e.get("data", {}).get("prompt_id") == prompt_id and e["type"] in
                              ("execution_success", "execution_error", "execution_interrupted"), timeout)
        for _ in range(100):
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                return ev["type"], hist[prompt_id]
            time.sleep(0.1)
        return ev["type"], None


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    # --cache-classic: ComfyUI 0.33's default cache drops node outputs when the machine's free RAM falls below
    # 10 % of its RAM (other processes' load), which would make the cache test depend on the machine; classic
    # caching (0.3.64's default) keeps them.
    comfy_dir = comfyui_dir_or_skip()
    pipeline_dir = request.getfixturevalue("pipeline_dir")
    tmp = tmp_path_factory.mktemp("comfyui")
    (tmp / "base" / "custom_nodes").mkdir(parents=True)
    (tmp / "custom").mkdir()
    os.symlink(REPO, tmp / "custom" / "lens-nodes")
    for sub in ("diffusion_models", "text_encoders", "vae", "upscale_models"):
        (tmp / "models" / sub).mkdir(parents=True)
    _write_tiny_upscaler(tmp / "models" / "upscale_models" / UPSCALER)
    _write_dits(tmp / "models" / "diffusion_models", request.getfixturevalue("golden_dir"))
    _write_ggufs(tmp / "models", request.getfixturevalue("golden_dir"), pipeline_dir)
    os.symlink(pipeline_dir, tmp / "models" / "diffusion_models" / TINY)
    os.symlink(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors",
               tmp / "models" / "diffusion_models" / "misplaced-flux2-vae.safetensors")
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(f"lens_nodes_test:\n    base_path: {tmp}\n    custom_nodes: custom\n"
                    f"    diffusion_models: models/diffusion_models\n    text_encoders: models/text_encoders\n"
                    f"    vae: models/vae\n    upscale_models: models/upscale_models\n")
    tried = []
    for _attempt in range(3):
        port = _free_port(exclude=tried)
        tried.append(port)
        out = subprocess.run(["bash", str(TOOL), "start", comfy_dir, str(port), "--base-directory",
                              str(tmp / "base"), "--extra-model-paths-config", str(yaml), "--preview-method", "auto",
                              "--cache-classic"],
                             capture_output=True, text=True, timeout=200)
        log = pathlib.Path(comfy_dir) / f"server-{port}.log"
        if out.returncode != 0:
            text = log.read_text()[-3000:] if log.exists() else ""
            if log.exists():
                log.unlink()
            pytest.fail(f"ComfyUI did not start: {out.stderr}{text}")
        pid = int(out.stdout.strip().splitlines()[-1])
        if _is_our_server(port, tmp / "base"):
            break
        try:                          # ours lost the port to another session's server: stop ours, try another
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    else:
        pytest.fail(f"ports {tried} were taken by other ComfyUI servers")
    srv = Server(port, pid, tmp / "base", log)
    try:
        yield srv
    finally:
        srv.ws.close()
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        if log.exists():            # the launcher writes its log into the ComfyUI folder: keep it out of there
            (tmp / log.name).write_text(log.read_text())
            log.unlink()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _workflow_prompt(name, object_info, **changes):
    wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    prompt = ui_to_api(wf, object_info)
    for node in prompt.values():
        inputs, t = node["inputs"], node["class_type"]
        if t == "LensModelLoader" and inputs["model_name"] != "lens_bf16.safetensors":
            inputs["model_name"] = TINY
        elif t == "LensTextEncoderLoader":
            inputs["text_encoder_name"] = TINY
        elif t == "LensVAELoader":
            inputs["vae_name"] = TINY
        elif t == "LensEmptyLatent":
            inputs.update(aspect_ratio="custom", width=96, height=64)
        elif t == "SaveImage":
            inputs["filename_prefix"] = f"lens_test/{name}"
        for key, value in changes.get(t, {}).items():
            inputs[key] = value
    return prompt


def _node_id(prompt, class_type):
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return nid


# ---------------------------------------------------------------------------------------------------------


def test_pack_loads_and_lists_every_node(server, object_info):
    log = server.log.read_text()
    assert "lens-nodes" in log                       # listed in the custom-node import times
    assert not [line for line in log.splitlines() if "lens-nodes" in line and "IMPORT FAILED" in line], log[-3000:]
    assert "Cannot import" not in log or "lens-nodes" not in log.split("Cannot import", 1)[1][:500]
    assert LENS_NODES <= set(object_info)
    for name in LENS_NODES:
        assert object_info[name]["python_module"] == "custom_nodes.lens-nodes"
        assert object_info[name]["category"].startswith("Lens/")
    assert TINY in object_info["LensModelLoader"]["input"]["required"]["model_name"][0]
    assert TINY in object_info["LensTextEncoderLoader"]["input"]["required"]["text_encoder_name"][0]
    templates = server.get("/workflow_templates")     # the template browser lists the pack's workflows
    assert {"lens_t2i", "lens_turbo_t2i", "lens_hires"} <= set(templates.get("lens-nodes", [])), templates
    stats = server.get("/system_stats")
    print("ComfyUI version:", stats["system"]["comfyui_version"])


def test_ui_helper_is_served(server, object_info):
    assert "/extensions/lens-nodes/lens_nodes.js" in server.get("/extensions")
    with urllib.request.urlopen(server.url("/extensions/lens-nodes/lens_nodes.js"), timeout=60) as r:
        js = r.read().decode()
    assert js == (REPO / "web" / "lens_nodes.js").read_text()
    spec = object_info["LensEmptyLatent"]["input"]["required"]["aspect_ratio"]
    assert spec[1]["lens_buckets"]["1024"]["16:9"] == [1376, 768]


def test_workflows_validate_against_live_object_info(object_info):
    native_lens = "pre_cfg" in object_info.get("CFGNorm", {}).get("input", {}).get("optional", {})
    for path in sorted((REPO / "workflows").glob("*.json")):
        if path.stem == "lens_native_official" and not native_lens:
            continue        # native Lens nodes (CFGNorm pre_cfg, CLIPLoader type lens) arrived in ComfyUI 0.33
        wf = json.loads(path.read_text())
        assert check_workflow(wf, object_info, check_combos=False) == [], path.name
        prompt = ui_to_api(wf, object_info)
        assert {v["class_type"] for v in prompt.values()} <= set(object_info)


@pytest.mark.parametrize("name,steps", [("lens_t2i", 20), ("lens_turbo_t2i", 4)])
def test_workflow_runs_saves_image_with_progress(server, object_info, name, steps):
    from PIL import Image

    prompt = _workflow_prompt(name, object_info)
    sampler = _node_id(prompt, "LensSampler")
    assert prompt[sampler]["inputs"]["steps"] == steps
    pid = server.submit(prompt)
    status, hist = server.finish(pid)
    assert status == "execution_success", hist and hist["status"]
    # progress: one websocket event per sampling step, and a latent preview per step
    events = server.ws.for_prompt(pid)
    progress = [e["data"] for k, e in events if k == "json" and e["type"] == "progress" and e["data"]["node"] == sampler]
    assert [p["value"] for p in progress] == list(range(1, steps + 1))
    assert all(p["max"] == steps for p in progress)
    previews = [e for k, e in events if k == "binary"]
    print(f"{name}: {len(progress)} progress events for {steps} steps, {len(previews)} binary previews")
    assert len(previews) >= steps
    # the saved image
    (images,) = [o["images"] for o in hist["outputs"].values() if "images" in o]
    img = images[0]
    path = server.base / "output" / img["subfolder"] / img["filename"]
    with Image.open(path) as im:
        assert im.size == (96, 64)


def test_hires_workflow_runs(server, object_info):
    """The hires workflow (t2i -> upscale model -> VAE encode -> LensSampler denoise 0.35 -> decode) at tiny
    sizes: 64² base, 4× upscale, scaled to 128² for the second pass."""
    from PIL import Image

    prompt = _workflow_prompt("lens_hires", object_info, UpscaleModelLoader={"model_name": UPSCALER},
                              LensEmptyLatent={"width": 64, "height": 64},
                              ImageScale={"width": 128, "height": 128})
    samplers = [k for k, v in prompt.items() if v["class_type"] == "LensSampler"]
    assert sorted(prompt[k]["inputs"]["denoise"] for k in samplers) == [0.35, 1.0]
    pid = server.submit(prompt)
    status, hist = server.finish(pid)
    assert status == "execution_success", hist and hist["status"]
    sizes = []
    for out in hist["outputs"].values():
        for img in out.get("images", []):
            with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
                sizes.append(im.size)
    assert sorted(sizes) == [(64, 64), (128, 128)]
    second = max(samplers, key=int)
    steps = prompt[second]["inputs"]["steps"]
    done = [e["data"] for k, e in server.ws.for_prompt(pid) if k == "json" and e["type"] == "progress"
            and e["data"]["node"] == second]
    run = round(steps * 0.35)                                    # denoise 0.35: the last 7 of 20 steps run
    assert [d["value"] for d in done] == list(range(1, run + 1)) and all(d["max"] == run for d in done)


def test_same_prompt_twice_reuses_cache(server, object_info):
    prompt = _workflow_prompt("lens_turbo_t2i", object_info, LensSampler={"seed": 4242})
    first = server.submit(prompt)
    assert server.finish(first)[0] == "execution_success"
    second = server.submit(copy.deepcopy(prompt))
    status, hist = server.finish(second)
    assert status == "execution_success"
    events = server.ws.for_prompt(second)
    cached = [e["data"]["nodes"] for k, e in events if k == "json" and e["type"] == "execution_cached"]
    assert cached and set(cached[0]) >= set(prompt) - {_node_id(prompt, "SaveImage")}
    ran = [e["data"]["node"] for k, e in events if k == "json" and e["type"] == "executing" and e["data"]["node"]]
    assert _node_id(prompt, "LensSampler") not in ran and _node_id(prompt, "LensModelLoader") not in ran


def test_interrupt_stops_sampling_and_next_run_succeeds(server, object_info):
    steps = 400
    prompt = _workflow_prompt("lens_t2i", object_info, LensSampler={"steps": steps, "seed": 99},
                              LensEmptyLatent={"width": 512, "height": 512})
    sampler = _node_id(prompt, "LensSampler")
    pid = server.submit(prompt)
    server.ws.wait_for(lambda e: e["type"] == "progress" and e["data"].get("prompt_id") == pid
                       and e["data"]["node"] == sampler)
    status_code, _ = server.post("/interrupt", {})
    assert status_code == 200
    status, hist = server.finish(pid)
    assert status == "execution_interrupted"
    done = [e["data"]["value"] for k, e in server.ws.for_prompt(pid) if k == "json" and e["type"] == "progress"
            and e["data"]["node"] == sampler]
    print(f"interrupted after {max(done)} of {steps} steps")
    assert max(done) < steps
    again = _workflow_prompt("lens_turbo_t2i", object_info, LensSampler={"seed": 100})
    assert server.finish(server.submit(again))[0] == "execution_success"


def _expect_error(server, prompt, *needles):
    pid = server.submit(prompt)
    status, hist = server.finish(pid)
    assert status == "execution_error"
    (err,) = [e["data"] for k, e in server.ws.for_prompt(pid) if k == "json" and e["type"] == "execution_error"]
    print(f"{err['node_type']}: {err['exception_type']}: {err['exception_message']}")
    for needle in needles:
        assert needle in err["exception_message"], err["exception_message"]
    # what the UI shows: a builtin type (not the pack's module path) and a one-line message
    assert err["exception_type"] in ("ValueError", "FileNotFoundError", "OSError"), err["exception_type"]
    assert "\n" not in err["exception_message"].strip(), err["exception_message"]
    return err


def test_bad_inputs_fail_with_a_fix_and_comfyui_keeps_running(server, object_info):
    vae = {"class_type": "LensVAELoader", "inputs": {"vae_name": TINY}}
    # a VAE file put in diffusion_models and picked in the model loader
    p = _workflow_prompt("lens_turbo_t2i", object_info,
                         LensModelLoader={"model_name": "misplaced-flux2-vae.safetensors"})
    err = _expect_error(server, p, "misplaced-flux2-vae.safetensors", "FLUX.2 VAE", "LensVAELoader", "Fix")
    assert err["node_type"] == "LensModelLoader" and err["exception_type"] == "ValueError"
    # a latent of another model family (SD-style 4 channels) into the Lens decoder
    p = {"1": vae, "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "3": {"class_type": "LensVAEDecode", "inputs": {"vae": ["1", 0], "samples": ["2", 0], "tiled": "auto"}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    _expect_error(server, p, "expected a Lens / FLUX.2 latent", "another model family", "LensEmptyLatent")
    # a custom size that is not a multiple of 16
    p = _workflow_prompt("lens_turbo_t2i", object_info, LensEmptyLatent={"width": 1000, "height": 1000})
    _expect_error(server, p, "multiple of 16", "Fix")
    # conditioning from a text encoder whose width does not fit the model (4×64 into a 4×32 model)
    p = _workflow_prompt("lens_turbo_t2i", object_info,
                         LensModelLoader={"model_name": "lens-narrow-text_bf16.safetensors"})
    err = _expect_error(server, p, "conditioning width 256", "4×32 = 128", "LensTextEncode")
    assert err["node_type"] == "LensSampler"
    # ComfyUI is still up and runs the next prompt
    assert server.get("/system_stats")["system"]["comfyui_version"]
    good = _workflow_prompt("lens_turbo_t2i", object_info, LensSampler={"seed": 5})
    assert server.finish(server.submit(good))[0] == "execution_success"


INPROCESS = r'''
import importlib.util, json, sys, torch
repo, pipeline_dir, models = sys.argv[1], sys.argv[2], sys.argv[3]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm, folder_paths
folder_paths.add_model_folder_path("diffusion_models", models, is_default=True)
spec = importlib.util.spec_from_file_location("lens_nodes_inproc", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_inproc"] = pack; spec.loader.exec_module(pack)
N = pack.NODE_CLASS_MAPPINGS
model, te, vae = N["LensCheckpointLoader"]().load("Lens-tiny")
enc = N["LensTextEncode"]()
(pos,), (neg,) = enc.encode(te, "a red cube on a wooden table"), enc.encode(te, "")
(lat,) = N["LensEmptyLatent"]().generate("custom", 1024, 96, 64, 1)
run = lambda: N["LensSampler"]().sample(model, pos, neg, lat, 3, 4, 5.0, 1.0)[0]["samples"]
full = run()
N["LensVAEDecode"]().decode(vae, {"samples": full}, "auto")
# all three models are known to ComfyUI's memory manager (what lets one evict another) ...
registered = sorted(type(lm.model.model).__name__ for lm in mm.current_loaded_models if lm.model is not None)
# ... and can be evicted the way ComfyUI frees memory for another model, then reload with the same numbers
mm.free_memory(1e30, mm.get_torch_device())
left_after_evict = len(mm.current_loaded_models)
again = run()
report = {}
for name, h in (("model", model), ("text_encoder", te), ("vae", vae)):
    params = [m for m in getattr(h, "patcher", h).model.modules() if any(True for _ in m.parameters(recurse=False))]
    report[name] = sorted({type(m).__name__ for m in params if not hasattr(m, "comfy_cast_weights")})
# ComfyUI's partial (lowvram) load: a tiny budget leaves every comfy.ops layer on the offload device in
# cast-per-call mode; the forward must still work and give the same numbers
mm.unload_all_models()
model.load(model.load_device, lowvram_model_memory=1)          # the DiT is a MODEL: a ModelPatcher itself
casting = sum(1 for m in model.model.modules() if getattr(m, "prev_comfy_cast_weights", None) is not None)
low = N["LensSampler"]().sample(model, pos, neg, lat, 3, 4, 5.0, 1.0)[0]["samples"]
# the packed expert banks: ComfyUI's own load list counts their packed bytes (entries are (size, name, module,
# params) in 0.3.64 and (offload cost, size, name, module, params) in 0.33), and a partial load leaves them in
# cast-per-call mode like every comfy.ops layer
PackedExperts = sys.modules["lens_nodes_inproc.lens_core.quant"].PackedExperts
banks = [(e[-4], e[-2]) for e in te.patcher._load_list() if isinstance(e[-2], PackedExperts)]
bank_bytes_counted = bool(banks) and all(size == sum(p.nbytes for p in m.parameters()) for size, m in banks)
te.patcher.load(te.patcher.load_device, lowvram_model_memory=1)
banks_cast_per_call = all(getattr(m, "prev_comfy_cast_weights", None) is not None for _, m in banks)
(pos2,) = enc.encode(te, "a red cube on a wooden table")
print(json.dumps({"registered": registered, "left_after_evict": left_after_evict,
                  "reload_equal": bool(torch.equal(full, again)), "non_comfy_param_modules": report, "lowvram_layers": casting,
                  "lowvram_equal": bool(torch.equal(full, low)),
                  "te_equal": bool(torch.equal(pos[0][0], pos2[0][0])), "banks": len(banks),
                  "bank_bytes_counted": bank_bytes_counted, "banks_cast_per_call": banks_cast_per_call}))
'''


def test_in_process_eviction_and_lowvram_load_keep_numbers(server, tmp_path):
    """In-process with the real comfy modules: the three models are registered with ComfyUI's memory manager
    by load_models_gpu, ComfyUI's free_memory evicts them and the next use reloads them with identical
    numbers; after ComfyUI's partial (lowvram) load of the DiT and the text encoder, sampling and encoding
    give the same numbers. (On a CPU-only machine load and offload device are
    the same, so this exercises ComfyUI's lowvram bookkeeping with our modules, not a GPU split.)"""
    script = tmp_path / "inprocess.py"
    script.write_text(INPROCESS)
    models = server.base.parent / "models" / "diffusion_models"
    out = subprocess.run(["bash", str(TOOL), "python", os.environ["COMFYUI_DIR"], str(script), str(REPO),
                          "", str(models)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["registered"] == ["LensPackModel", "LensTextEncoder", "LensVAE"]
    assert result["left_after_evict"] == 0 and result["reload_equal"]
    assert result["lowvram_layers"] > 0
    assert result["lowvram_equal"] and result["te_equal"]
    assert result["banks"] > 0 and result["bank_bytes_counted"] and result["banks_cast_per_call"]


DYNAMIC = r'''
import importlib.util, json, logging, sys, torch
repo, models = sys.argv[1], sys.argv[2]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm, comfy.model_patcher as mp, folder_paths
if not hasattr(mp, "ModelPatcherDynamic"):
    print(json.dumps({"dynamic": None})); sys.exit(0)
import comfy.memory_management
folder_paths.add_model_folder_path("diffusion_models", models, is_default=True)
spec = importlib.util.spec_from_file_location("lens_nodes_inproc", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_inproc"] = pack; spec.loader.exec_module(pack)
N = pack.NODE_CLASS_MAPPINGS
def run():
    model, te, vae = N["LensCheckpointLoader"]().load("Lens-tiny")
    enc = N["LensTextEncode"]()
    (pos,), (neg,) = enc.encode(te, "a red cube on a wooden table"), enc.encode(te, "")
    (lat,) = N["LensEmptyLatent"]().generate("custom", 1024, 96, 64, 1)
    out = N["LensSampler"]().sample(model, pos, neg, lat, 3, 4, 5.0, 1.0)[0]
    (img,) = N["LensVAEDecode"]().decode(vae, out, "auto")
    return (model, te, vae), (pos[0][0], out["samples"], img)
_, classic = run()
mm.unload_all_models()
# what ComfyUI 0.33's main.py does when comfy-aimdo initialises (NVIDIA): comfy.ops Linear/Embedding build
# lazily and CoreModelPatcher is ModelPatcherDynamic. Two CPU-only adaptations, nothing else replaced: the
# pinned host buffer (CUDA) is an empty stand-in (nothing is pinned without a VBAR), and ModelPatcherDynamic's
# hand-off of CPU load devices to ModelPatcher is skipped.
import comfy_aimdo.host_buffer
class HostBuffer:
    size = 0
    def __init__(self, *args, **kwargs):
        pass
comfy_aimdo.host_buffer.HostBuffer = HostBuffer
class CPUDynamic(mp.ModelPatcherDynamic):
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)
mp.CoreModelPatcher = CPUDynamic
comfy.memory_management.aimdo_enabled = True
logs = []
class Collect(logging.Handler):
    def emit(self, record):
        logs.append(record.getMessage())
logging.getLogger().addHandler(Collect()); logging.getLogger().setLevel(logging.INFO)
handles, dynamic = run()
print(json.dumps({"dynamic": [getattr(h, "patcher", h).is_dynamic() for h in handles],
                  "equal": [bool(torch.equal(a, b)) for a, b in zip(classic, dynamic)],
                  "prepared": [m for m in logs if "prepared for dynamic VRAM loading" in m]}))
'''


def test_in_process_dynamic_vram_patcher_keeps_numbers(server, tmp_path):
    """ComfyUI 0.33's dynamic VRAM path with our models, in-process on the CPU: with comfy-aimdo's switches set
    as ComfyUI's main.py sets them (lazy comfy.ops layers, CoreModelPatcher = ModelPatcherDynamic), the three
    loaders still build their models, the tiny models get the dynamic patcher (all their bulk is comfy.ops
    weight/bias), ModelPatcherDynamic.load walks every module (staging comfy.ops weights, force-loading the rest,
    packed expert banks included) and text encoding, sampling and decoding give the numbers of the classic
    patcher bit for bit. The VBAR streaming itself (comfy-aimdo) needs a GPU and is not exercised."""
    script = tmp_path / "dynamic.py"
    script.write_text(DYNAMIC)
    models = server.base.parent / "models" / "diffusion_models"
    out = subprocess.run(["bash", str(TOOL), "python", os.environ["COMFYUI_DIR"], str(script), str(REPO),
                          str(models)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    if result["dynamic"] is None:
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic came with #11845, Feb 2026)")
    assert result["dynamic"] == [True, True, True]
    assert result["equal"] == [True, True, True]
    assert len(result["prepared"]) >= 3


PLANS = r'''
import importlib.util, json, sys
repo = sys.argv[1]
sys.path[:0] = [repo, repo + "/tests"]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_patcher as mp
spec = importlib.util.spec_from_file_location("lens_nodes_inproc", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_inproc"] = pack; spec.loader.exec_module(pack)
from test_nodes import real_size_patcher_plans
ops = sys.modules["lens_nodes_inproc.nodes.bridge"].operations()
out = {"classic": real_size_patcher_plans(ops)}
if hasattr(mp, "ModelPatcherDynamic"):      # what ComfyUI 0.33's main.py switches on with comfy-aimdo (NVIDIA)
    import comfy.memory_management
    mp.CoreModelPatcher = mp.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    out["dynamic"] = real_size_patcher_plans(ops)
print(json.dumps(out))
'''


def test_patcher_choice_with_real_comfy_ops(server, tmp_path):
    """The real-size patcher choice of test_nodes.test_patcher_choice_for_dynamic_vram_at_real_size with the real
    comfy.ops layers (on ``meta``), with dynamic VRAM off and, where ComfyUI has it, switched on the way its
    main.py does (lazy comfy.ops layers; CoreModelPatcher = ModelPatcherDynamic): the bf16 DiT and the VAE get
    the dynamic patcher, the packed text encoder and fp8 DiT the classic one."""
    from test_nodes import check_real_size_patcher_plans

    script = tmp_path / "plans.py"
    script.write_text(PLANS)
    out = subprocess.run(["bash", str(TOOL), "python", os.environ["COMFYUI_DIR"], str(script), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    check_real_size_patcher_plans(result["classic"])
    assert set(result["classic"]["classes"].values()) == {"ModelPatcher"}
    if comfyui_version(os.environ["COMFYUI_DIR"]) >= NEWEST:
        check_real_size_patcher_plans(result["dynamic"])
        assert result["dynamic"]["classes"] == {"dit": "ModelPatcherDynamic", "dit_fp8": "ModelPatcher",
                                                "te": "ModelPatcher", "vae": "ModelPatcherDynamic"}


SIGNATURES = r'''
import importlib, inspect, json, sys
import comfy.cli_args
comfy.cli_args.args.cpu = True
names = json.loads(sys.argv[1])
out = {}
for mod, attrs in names.items():
    m = importlib.import_module(mod)
    for a in attrs:
        obj = getattr(m, a, None)
        if obj is None:
            out[f"{mod}.{a}"] = None
            continue
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            out[f"{mod}.{a}"] = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            out[f"{mod}.{a}"] = "?"
print(json.dumps(out))
'''


NEWEST = (0, 33, 0)         # the verified target: the stand-in follows its signatures


def comfyui_version(comfy_dir) -> tuple:
    """(major, minor, patch) of the ComfyUI checkout in ``comfy_dir`` (its generated comfyui_version.py)."""
    import re

    text = (pathlib.Path(comfy_dir) / "comfyui_version.py").read_text()
    found = re.search(r'__version__\s*=\s*"(\d+)\.(\d+)\.(\d+)', text)
    assert found, f"no __version__ in {comfy_dir}/comfyui_version.py"
    return tuple(int(x) for x in found.groups())


def test_stand_in_signatures_match_real_comfy(server, tmp_path):
    """Every function/class of tests/comfy_stub exists in the real ComfyUI with the same parameter names (in
    ComfyUI 0.33, the newest verified; an older ComfyUI's parameter list must be a prefix of the stand-in's:
    newer ComfyUI only appended optional parameters)."""
    import ast

    exact = comfyui_version(os.environ["COMFYUI_DIR"]) >= NEWEST

    stub = REPO / "tests" / "comfy_stub"
    names = {}
    for path in list((stub / "comfy").glob("*.py")) + list(stub.glob("*.py")):
        if path.name == "__init__.py":
            continue
        mod = path.stem if path.parent == stub else f"comfy.{path.stem}"
        tree = ast.parse(path.read_text())
        names[mod] = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                      and not n.name.startswith("_") and n.name != "set_models_dir"]
    assert sum(len(v) for v in names.values()) > 30
    script = tmp_path / "signatures.py"
    script.write_text(SIGNATURES)
    out = subprocess.run(["bash", str(TOOL), "python", os.environ["COMFYUI_DIR"], str(script), json.dumps(names)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    real = json.loads(out.stdout.strip().splitlines()[-1])
    mismatches = []
    for mod, attrs in names.items():
        tree = ast.parse((stub / (mod.replace(".", "/") + ".py")).read_text())
        for a in attrs:
            key = f"{mod}.{a}"
            if real.get(key) is None:
                mismatches.append(f"{key}: missing in ComfyUI")
                continue
            node = next(n for n in tree.body if getattr(n, "name", None) == a)
            if isinstance(node, ast.ClassDef):
                node = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
                if node is None:
                    continue
            params = [x.arg for x in node.args.args + node.args.kwonlyargs]
            if real[key] == "?":
                continue
            if (params != real[key]) if exact else (params[:len(real[key])] != real[key]):
                mismatches.append(f"{key}: stand-in {params} vs ComfyUI {real[key]}")
    assert mismatches == [], mismatches


def test_native_empty_latent_feeds_lens_sampler(server, object_info):
    """Core EmptyLatentImage (4 channels, 1/8) into LensSampler: Lens-size zeros are built, the run succeeds."""
    from PIL import Image

    prompt = _workflow_prompt("lens_turbo_t2i", object_info, LensSampler={"seed": 11})
    latent = _node_id(prompt, "LensEmptyLatent")
    prompt[latent] = {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}}
    status, hist = server.finish(server.submit(prompt))
    assert status == "execution_success", hist and hist["status"]
    (images,) = [o["images"] for o in hist["outputs"].values() if "images" in o]
    with Image.open(server.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
        assert im.size == (96, 64)


MASKS = r'''
import json, sys, torch
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.utils
sys.path.insert(0, sys.argv[1])
from lens_core.sampling import prepare_mask
g = torch.Generator().manual_seed(0)
worst = 0.0
for shape, batch, grid in (((64, 96), 1, (4, 6)), ((2, 1, 50, 70), 3, (4, 6)), ((3, 33, 17), 2, (8, 5)),
                           ((1, 1, 16, 16), 2, (1, 1))):
    m = torch.rand(*shape, generator=g)
    ref = comfy.utils.reshape_mask(m, (batch, 128) + grid)[:, :1]
    ours = prepare_mask(m, batch, *grid).reshape(batch, 1, *grid)
    worst = max(worst, (ref - ours).abs().max().item())
print(json.dumps({"max_abs": worst}))
'''


def test_mask_preparation_matches_comfyui(server, tmp_path):
    """lens_core.sampling.prepare_mask resizes and batches a noise mask exactly as ComfyUI's own samplers do."""
    script = tmp_path / "masks.py"
    script.write_text(MASKS)
    out = subprocess.run(["bash", str(TOOL), "python", os.environ["COMFYUI_DIR"], str(script), str(REPO)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["max_abs"] == 0.0


def test_inpaint_workflow_runs(server, object_info):
    """workflows/lens_inpaint.json: LoadImage (an RGBA picture whose transparent right half is the mask) ->
    LensVAEEncode -> Set Latent Noise Mask -> LensSampler -> decode -> save."""
    import numpy as np
    from PIL import Image

    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    rgba[:, :48, 3] = 255                       # opaque left half = keep; transparent right half = regenerate
    (server.base / "input").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(server.base / "input" / "lens_inpaint_test.png")
    prompt = _workflow_prompt("lens_inpaint", object_info, LoadImage={"image": "lens_inpaint_test.png"},
                              LensSampler={"steps": 2})
    status, hist = server.finish(server.submit(prompt))
    assert status == "execution_success", hist and hist["status"]
    (images,) = [o["images"] for o in hist["outputs"].values() if "images" in o]
    with Image.open(server.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
        assert im.size == (96, 64)


def test_prompt_enhance_feeds_encode_sample_decode(server, object_info):
    """LensPromptEnhance (STRING) -> LensTextEncode -> LensSampler -> LensVAEDecode -> SaveImage on the tiny
    golden pipeline: the graph runs, the enhancer reports progress per token batch, the image is saved."""
    from PIL import Image

    assert object_info["LensPromptEnhance"]["output"] == ["STRING"]
    prompt = {
        "1": {"class_type": "LensCheckpointLoader", "inputs": {"folder": TINY, "weight_dtype": "default",
                                                               "variant": "auto", "text_encoder_device": "default",
                                                               "experts": "packed"}},
        "2": {"class_type": "LensPromptEnhance", "inputs": {"text_encoder": ["1", 1], "text": "a red cube",
                                                            "seed": 5, "max_new_tokens": 40, "temperature": 0.7}},
        "3": {"class_type": "LensTextEncode", "inputs": {"text_encoder": ["1", 1], "text": ["2", 0]}},
        "4": {"class_type": "LensTextEncode", "inputs": {"text_encoder": ["1", 1], "text": ""}},
        "5": {"class_type": "LensEmptyLatent", "inputs": {"aspect_ratio": "custom", "base_resolution": 1024,
                                                          "width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "LensSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                      "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                      "denoise": 1.0}},
        "7": {"class_type": "LensVAEDecode", "inputs": {"vae": ["1", 2], "samples": ["6", 0], "tiled": "auto"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "lens_test/enhance"}},
    }
    pid = server.submit(prompt)
    status, hist = server.finish(pid)
    assert status == "execution_success", hist and hist["status"]
    events = server.ws.for_prompt(pid)
    progress = [e["data"] for k, e in events if k == "json" and e["type"] == "progress" and e["data"]["node"] == "2"]
    print(f"enhance: {len(progress)} progress events, values {[p['value'] for p in progress]}")
    assert progress and all(p["max"] == 40 for p in progress) and progress[-1]["value"] == 40
    (images,) = [o["images"] for o in hist["outputs"].values() if "images" in o]
    with Image.open(server.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
        assert im.size == (64, 64)


def test_hostile_files_through_the_loader_nodes_keep_the_server_up(server, object_info, golden_dir, pipeline_dir):
    """Issue 12: the file cases of tests/test_hostile.py through the loader nodes of a running ComfyUI: each ends
    as a node error naming the file and the problem, the folder listing survives a symlink loop, and the next
    prompt succeeds."""
    import shutil

    from fixtures import write_truncated
    from test_hostile import DATA, LIES, VALID, write_raw

    models = server.base.parent / "models"
    dm, vae_dir = models / "diffusion_models", models / "vae"
    header, data, _ = LIES["overlap"]
    write_raw(dm / "lying-header_bf16.safetensors", header, data)
    write_raw(dm / "into-the-header_bf16.safetensors", *LIES["offsets into the header"][:2])
    write_truncated(dm / "lens_bf16.safetensors", dm / "half-download_bf16.safetensors")
    absurd = dm / "Lens-absurd"                     # a diffusers folder whose transformer config asks for 10^9 layers
    absurd.mkdir()
    for entry in pipeline_dir.iterdir():
        if entry.name == "transformer":
            shutil.copytree(entry, absurd / "transformer")
        else:
            os.symlink(entry, absurd / entry.name)
    cfg = json.loads((absurd / "transformer" / "config.json").read_text())
    (absurd / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_layers": 10 ** 9}))
    escape = dm / "Lens-escape" / "transformer"     # a component folder whose index names a file outside it
    escape.mkdir(parents=True)
    write_raw(dm / "secret.safetensors", VALID, DATA)
    (escape / "config.json").write_text(json.dumps(cfg))
    (escape / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (escape / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"img_in.weight": "../../secret.safetensors"}}))
    names = ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight",
             "first_stage_model.encoder.down.0.block.0.conv1.weight")
    import torch
    from safetensors.torch import save_file
    save_file({n: torch.zeros(1) for n in names}, str(vae_dir / "sd_xl_base_1.0.safetensors"))
    os.symlink(dm, dm / "loop")                     # a symlink loop in the models folder
    try:
        _hostile_prompts(server, object_info)
    finally:
        (dm / "loop").unlink()


def _hostile_prompts(server, object_info):

    info = server.get("/object_info/LensModelLoader")["LensModelLoader"]["input"]["required"]["model_name"][0]
    assert "Lens-absurd" in info and "lying-header_bf16.safetensors" in info
    assert not any(n.startswith("loop/") for n in info), info

    def model(name, *needles):
        p = _workflow_prompt("lens_turbo_t2i", object_info, LensModelLoader={"model_name": name})
        err = _expect_error(server, p, name, *needles)
        assert err["node_type"] == "LensModelLoader" and err["exception_type"] == "ValueError"

    model("lying-header_bf16.safetensors", "invalid safetensors header", "overlaps")
    model("into-the-header_bf16.safetensors", "invalid safetensors header", "non-negative integers")
    model("half-download_bf16.safetensors", "truncated safetensors file", "download it again")
    model("Lens-absurd", "num_layers", "[1, 128]", "found 1000000000")
    model("Lens-escape/transformer", "outside the index's folder")
    p = _workflow_prompt("lens_turbo_t2i", object_info, LensVAELoader={"vae_name": "sd_xl_base_1.0.safetensors"})
    err = _expect_error(server, p, "sd_xl_base_1.0.safetensors", "SDXL UNet checkpoint (a full checkpoint")
    assert err["node_type"] == "LensVAELoader"
    assert server.get("/system_stats")["system"]["comfyui_version"]
    good = _workflow_prompt("lens_turbo_t2i", object_info, LensSampler={"seed": 7})
    assert server.finish(server.submit(good))[0] == "execution_success"


def test_gguf_t2i_runs(server, object_info):
    """The turbo t2i graph with a Q8_0 GGUF DiT and a GGUF GPT-OSS encoder (both tiny), listed by the loaders."""
    from PIL import Image

    assert GGUF_DIT in object_info["LensModelLoader"]["input"]["required"]["model_name"][0]
    assert GGUF_TE in object_info["LensTextEncoderLoader"]["input"]["required"]["text_encoder_name"][0]
    prompt = _workflow_prompt("lens_turbo_t2i", object_info,
                              LensModelLoader={"model_name": GGUF_DIT},
                              LensTextEncoderLoader={"text_encoder_name": GGUF_TE})
    pid = server.submit(prompt)
    status, hist = server.finish(pid)
    assert status == "execution_success", json.dumps(hist and hist["status"])[-3000:]
    (images,) = [o["images"] for o in hist["outputs"].values() if "images" in o]
    with Image.open(server.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
        assert im.size == (96, 64)


GGUF_INPROCESS = r'''
import importlib.util, json, sys, torch
repo, models = sys.argv[1], sys.argv[2]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm, folder_paths
folder_paths.add_model_folder_path("diffusion_models", models + "/diffusion_models", is_default=True)
folder_paths.add_model_folder_path("text_encoders", models + "/text_encoders", is_default=True)
spec = importlib.util.spec_from_file_location("lens_nodes_inproc", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lens_nodes_inproc"] = pack; spec.loader.exec_module(pack)
N = pack.NODE_CLASS_MAPPINGS
(model,) = N["LensModelLoader"]().load(sys.argv[3])
(te,) = N["LensTextEncoderLoader"]().load(sys.argv[4])
enc = N["LensTextEncode"]()
(pos,), (neg,) = enc.encode(te, "a red cube on a wooden table"), enc.encode(te, "")
(lat,) = N["LensEmptyLatent"]().generate("custom", 1024, 96, 64, 1)
run = lambda: N["LensSampler"]().sample(model, pos, neg, lat, 3, 2, 5.0, 1.0)[0]["samples"]
full = run()
mm.unload_all_models()
model.load(model.load_device, lowvram_model_memory=1)
gguf = [m for m in model.model.modules() if type(m).__name__ == "GGUFLinear"]
casting = sum(1 for m in gguf if getattr(m, "prev_comfy_cast_weights", None) is not None)
low = run()
te.patcher.load(te.patcher.load_device, lowvram_model_memory=1)
(pos2,) = enc.encode(te, "a red cube on a wooden table")
print(json.dumps({"gguf_layers": len(gguf), "lowvram_gguf_layers": casting, "lowvram_equal": bool(torch.equal(full, low)),
                  "te_equal": bool(torch.equal(pos[0][0], pos2[0][0]))}))
'''


def test_gguf_lowvram_load_keeps_numbers(server, tmp_path):
    """ComfyUI's partial (lowvram) load of a GGUF DiT and a GGUF encoder: the GGUFLinear layers are put in
    cast-per-call mode by ComfyUI's ModelPatcher and sampling / encoding give the same numbers."""
    script = tmp_path / "gguf_inprocess.py"
    script.write_text(GGUF_INPROCESS)
    models = server.base.parent / "models"
    out = subprocess.run(["bash", str(TOOL), "python", os.environ["COMFYUI_DIR"], str(script), str(REPO),
                          str(models), GGUF_DIT, GGUF_TE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["gguf_layers"] > 0 and result["lowvram_gguf_layers"] == result["gguf_layers"]
    assert result["lowvram_equal"] and result["te_equal"]
