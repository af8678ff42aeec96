"""``python -m lens_core batch JOBS --out DIR``: many images from a JSONL job list, resumable, optionally on Ray.

A job is one JSON object per line whose keys are ``generate``'s long option names (``prompt``, ``negative``,
``height``, ``width``, ``aspect``, ``base``, ``steps``, ``cfg``, ``seed``, ``batch-index``, ``variant``,
``lora``, ``image``, ``mask``, ``denoise``, ``enhance``, ``model``, ``dtype``, … ; ``-`` or ``_`` alike) plus an
optional ``name`` (the output is ``DIR/<name>.png``; default: a hash of the job). Every ``generate`` option given
on the ``batch`` command line is a default for every job; a job's own key replaces it (``null`` = not set).

Run order: every line is parsed and checked first (``generate``'s own parser and :func:`validate_generate`; then
``generate``'s header and LoRA checks once per model configuration and LoRA set) —
one bad line stops the run before any model loads, naming the line (``--skip-invalid`` records it and goes
on). Jobs are then grouped by model configuration (files, dtype, device, variant, fp8, offload, memory) and,
within one, by LoRA set: a worker loads each configuration once and switches LoRAs on the loaded DiT
(:meth:`LensPipeline.set_loras`). ``dry-run`` / ``plan-json`` are refused (there is no batch dry run).

Each image is rendered and encoded by the same code as ``generate`` (:func:`render_image`, :func:`png_bytes`)
and written through a temporary file and a rename (:func:`write_atomic`). ``DIR/manifest.jsonl`` gets one
record per job as it ends (output, sha256, seed, timings, worker, or the error), and is compacted to one line
per job when the run ends. A job is skipped on a later run when the manifest holds an ``ok`` record with the
same job key (all of the job's parameters, the sizes and dates of its files — model, LoRA, image, mask — and
the CPU thread count) and the output file on disk still has the recorded sha256.

The image of a job depends only on the job and the model files: each job draws its own seeded noise, LoRA sets
are applied to the exact base weights, and every worker runs ``--threads`` intra-op threads (on CPU, oneDNN's
kernels split sums by thread count, so the thread count is part of the job; on GPU the same card model and
dtype). ``--ray`` runs the same jobs on Ray actors (:mod:`lens_core.batch_ray`).

Exit status: 0 every job done (or skipped); 2 nothing ran (bad JOBS line, bad option; one ``error:`` line);
3 a package is missing (PyTorch, or Ray for ``--ray``); 130 interrupted; 100 + k when k jobs failed or were
invalid (k capped at 25: 125 = 25 or more).
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import difflib
import hashlib
import json
import os
import signal
import socket
import sys
import time

MANIFEST = "manifest.jsonl"
LOCK = ".lens-batch.lock"
MAX_LINE_BYTES = 1 << 20
MAX_JOBS = 10_000_000
MAX_NAME = 120
EXIT_FAILED = 100
EXIT_FAILED_CAP = 25
#: generate options that are not job keys (one image per job: ``--num-images`` → several jobs / ``batch-index``)
NOT_JOB_KEYS = {"out": "the output is DIR/<name>.png: use \"name\"",
                "num_images": "one job is one image: write one job per image (\"batch-index\" picks image k of "
                              "a seed's batch)",
                "overwrite": "--overwrite is an option of the whole batch command (replace files in DIR that no "
                             "batch run wrote)"}
#: generate options ``batch`` refuses (on its command line and as job keys): batch loads and renders, and checks
#: every job before loading anyway
REFUSED_KEYS = {"dry_run": "batch has no dry run (every job is checked before anything loads); fix: drop it, or "
                           "run generate --dry-run with one job's options to see its memory plan",
                "plan_json": "batch has no dry run, so no plan to print; fix: drop it, or run generate --dry-run "
                             "--plan-json with one job's options"}
PATH_KEYS = ("model", "text_encoder", "vae", "tokenizer", "image", "mask", "prompt_file")
#: options that decide what is loaded: jobs sharing them share a loaded pipeline
MODEL_KEYS = ("model", "text_encoder", "vae", "tokenizer", "dtype", "device", "offload", "fp8", "variant", "memory")
MAX_FINGERPRINT_FILES = 10_000


class JobError(ValueError):
    """A job line that cannot run (the message names the JOBS line)."""


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting (job lines are parsed with it)."""

    def error(self, message):
        raise JobError(message)


def add_batch_parser(sub, generate) -> argparse.ArgumentParser:
    """The ``batch`` sub-command: its own options plus every ``generate`` option as a job default.

    ``generate``: the generate sub-parser. argparse has no public way to clone options, so its Action objects
    are copied (defaults suppressed: only the options given on the command line become job defaults); types,
    choices and help stay defined once, in ``generate``."""
    b = sub.add_parser(
        "batch", help="generate many images from a JSONL job list (resumable; --ray for clusters)",
        description="Generate one image per line of JOBS (JSON objects keyed by generate's long option names, "
                    "plus an optional \"name\"); generate options given here are defaults for every job. Re-running "
                    "the same command skips jobs whose output exists and matches. See README 'Batch and "
                    "clusters'.",
        epilog="exit status: 0 every job done or skipped; 2 nothing ran (bad JOBS line or option); 3 a package is "
               "missing (PyTorch, or Ray for --ray); 130 interrupted (run again to resume); 100+k: k jobs failed "
               "or were invalid (125 = 25 or more). Put JOBS before --ray (--ray takes an optional ADDRESS).")
    b.add_argument("jobs", metavar="JOBS", help="JSONL file, one job per line ('-' = standard input; blank lines "
                                                "and lines starting with # are ignored)")
    b.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: DIR/<name>.png per job and DIR/manifest.jsonl (created if missing)")
    b.add_argument("--skip-invalid", action="store_true",
                   help="record invalid job lines in the manifest and run the others (default: stop before "
                        "loading anything)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace files in DIR that no batch run wrote (default: such a file fails its job and stays "
                        "as it is; outputs recorded in DIR/manifest.jsonl are replaced when their job changed)")
    b.add_argument("--threads", type=int, default=None,
                   help="PyTorch CPU threads of every worker (default: this machine's PyTorch default); on CPU the "
                        "images are bit-identical between runs with the same --threads")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: no ADDRESS = start a local cluster, 'auto' = the cluster this machine is "
                        "attached to, or host:port / ray://host:port (needs: pip install -r requirements-ray.txt)")
    b.add_argument("--workers", type=int, default=None,
                   help="with --ray: number of model-holding workers (default: one per GPU, or one per "
                        "--cpus-per-worker CPUs on a cluster without GPUs)")
    b.add_argument("--cpus-per-worker", type=int, default=None,
                   help="with --ray on CPUs: CPUs reserved per worker (default 1)")
    b.add_argument("--gather", action="store_true",
                   help="with --ray: workers send the PNGs back and this process writes them (default: workers "
                        "write into --out, a folder every node sees)")
    defaults = b.add_argument_group("job defaults (generate's options; a job's own keys replace them)")
    for action in generate._actions:
        if action.dest in ("help", *NOT_JOB_KEYS) or not action.option_strings:
            continue
        clone = copy.copy(action)
        clone.required = False
        clone.default = argparse.SUPPRESS
        defaults._add_action(clone)
    b.set_defaults(generate_parser=generate)
    return b


# ---- jobs -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    line: int                 # 1-based line in JOBS
    name: str
    args: dict                # generate's parsed options: absolute paths, the prompt text, out = DIR/<name>.png
    key: str = ""             # resume key (parameters + file fingerprints + threads)
    config: str = ""          # model configuration (grouping)
    loras: str = ""           # LoRA set (grouping within a configuration)
    attempts: int = 0
    replace: bool = False     # its output may replace an existing file (one a batch run recorded, or --overwrite)

    @property
    def output(self) -> str:
        return self.name + ".png"


def _generate_actions():
    """(the CLI parser raising :class:`JobError`, {dest: Action} of generate's options)."""
    from .__main__ import build_parser

    parser = build_parser(_RaisingParser)
    gen = parser.parse_args(["batch", "-", "--out", "."]).generate_parser
    return parser, {a.dest: a for a in gen._actions if a.option_strings and a.dest != "help"}


def _job_keys(actions) -> list[str]:
    return sorted([k.replace("_", "-") for k in actions if k not in NOT_JOB_KEYS] + ["name"])


def _tokens(dest: str, value, action, where: str) -> list[str]:
    """One option's value (JSON or command-line typed) → generate argv tokens (``--opt=value`` forms, so a value
    starting with '-' stays a value)."""
    flag = action.option_strings[0]
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise JobError(f"{where}{dest.replace('_', '-')}: expected true or false, found {value!r:.60}")
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:                        # store_true
        if not isinstance(value, bool):
            raise JobError(f"{where}{dest.replace('_', '-')}: expected true or false, found {value!r:.60}")
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise JobError(f"{where}{dest.replace('_', '-')}: expected a string or a list of strings, found "
                           f"{value!r:.60}")
        return [f"{flag}={v}" for v in items]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise JobError(f"{where}{dest.replace('_', '-')}: expected a string or a number, found "
                       f"{json.dumps(value)[:60]}")
    return [f"{flag}={value}"]


def _read_lines(path: str):
    """(line number, text) of JOBS, UTF-8, each line at most MAX_LINE_BYTES."""
    f = sys.stdin.buffer if path == "-" else None
    if f is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"JOBS {path}: no such file; fix: pass a JSONL file (one JSON object per line) "
                                    f"or '-' for standard input")
        f = open(path, "rb")
    label = "standard input" if path == "-" else path
    try:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if n > MAX_JOBS:
                raise ValueError(f"JOBS {label}: more than {MAX_JOBS} lines; fix: split the job list")
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):          # skip the rest of the line
                    raw = f.readline(MAX_LINE_BYTES)
                yield n, JobError(f"longer than {MAX_LINE_BYTES} bytes; fix: one job per line (a prompt is cut "
                                  f"at 512 tokens anyway)")
                continue
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield n, JobError(f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); fix: save "
                                  f"JOBS as UTF-8")
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _no_constants(name):
    raise JobError(f"{name} is not a number JSON allows; fix: use a finite number")


def parse_job(text: str, actions: dict, where: str) -> dict:
    """One JSON line → {dest: value} (keys checked, '-' → '_'); ``name`` kept as is."""
    from .checkpoints.safetensors import _dup_checked

    try:
        obj = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_dup_checked)
    except json.JSONDecodeError as exc:
        raise JobError(f"{where}invalid JSON ({exc.msg} at column {exc.colno}); fix: one JSON object per line, "
                       f"e.g. {{\"prompt\": \"a cat\", \"seed\": 1}}") from None
    except RecursionError:
        raise JobError(f"{where}JSON nested too deeply") from None
    except ValueError as exc:             # JobError (NaN) or a key given twice
        raise JobError(f"{where}{exc}; fix: keep one" if "twice" in str(exc) else f"{where}{exc}") from None
    if not isinstance(obj, dict):
        raise JobError(f"{where}expected a JSON object ({{\"prompt\": …}}), found {type(obj).__name__}")
    job = {}
    for key, value in obj.items():
        dest = key.replace("-", "_")
        if dest in NOT_JOB_KEYS or dest in REFUSED_KEYS:
            raise JobError(f"{where}{key!r} is not a job key: {NOT_JOB_KEYS.get(dest) or REFUSED_KEYS[dest]}")
        if dest != "name" and dest not in actions:
            close = difflib.get_close_matches(key.replace("_", "-"), _job_keys(actions), n=1)
            raise JobError(f"{where}unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") +
                           f"; expected generate's long option names: {', '.join(_job_keys(actions))}")
        job[dest] = value
    return job


def check_name(name, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise JobError(f"{where}name: expected a non-empty string of at most {MAX_NAME} characters, found "
                       f"{name!r:.60}")
    bad = [c for c in name if c in '/\\:*?"<>|' or ord(c) < 32]
    if bad or name.startswith(".") or name.strip() != name:
        raise JobError(f"{where}name {name!r}: expected a plain file name (no path separators, no leading dot or "
                       f"space, none of / \\ : * ? \" < > |); fix: e.g. \"cat-01\"")
    if name.lower().endswith(".png"):
        name = name[:-4]
    return name


def merge_defaults(cli: dict, job: dict) -> dict:
    """A job's options over the command line's: a job's own size (height/width or aspect) or prompt source
    replaces the command line's whole size / prompt choice rather than clashing with it."""
    merged = dict(cli)
    if "height" in job or "width" in job:
        merged.pop("aspect", None)
        merged.pop("base", None)
    if "aspect" in job:
        merged.pop("height", None)
        merged.pop("width", None)
    if "prompt" in job or "prompt_file" in job:
        merged.pop("prompt", None)
        merged.pop("prompt_file", None)
    merged.update({k: v for k, v in job.items() if k != "name"})
    return merged


def _absolute(ns: argparse.Namespace) -> None:
    """Every path absolute (workers elsewhere, and the PNG's regenerate command, see the same file)."""
    from .lora import parse_lora_arg

    for k in PATH_KEYS:
        if getattr(ns, k, None) is not None:
            setattr(ns, k, os.path.abspath(getattr(ns, k)))
    loras = []
    for item in ns.lora:
        path, strength = parse_lora_arg(item)
        loras.append(f"{os.path.abspath(path)}:{strength!r}")
    ns.lora = loras


def _stat(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(paths) -> dict:
    """{file: [size, mtime_ns]} of every file under ``paths`` (folders walked, symlinks followed)."""
    out = {}
    for p in sorted(set(paths)):
        if os.path.isfile(p):
            out[p] = _stat(p)
            continue
        for root, dirs, files in os.walk(p, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                out[full] = _stat(full)
                if len(out) > MAX_FINGERPRINT_FILES:
                    raise ValueError(f"{p}: more than {MAX_FINGERPRINT_FILES} files under the model path; fix: "
                                     f"point --model at the model folder itself")
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JobList:
    """Parses and validates JOBS (before anything loads); ``jobs`` are runnable, ``invalid`` the bad lines as
    manifest records."""

    def __init__(self, args, out_dir: str, threads: int, remote: bool):
        self.parser, self.actions = _generate_actions()
        self.out_dir = out_dir
        self.threads = threads
        self.remote = remote
        self.cli = {d: getattr(args, d) for d in self.actions if hasattr(args, d) and d not in NOT_JOB_KEYS}
        self._model_prints: dict = {}
        self._model_checks: dict = {}   # (config, LoRA set) → (first JOBS line, what check_models needs)
        self.jobs: list[Job] = []
        self.invalid: list[dict] = []
        self.names: dict = {}

    def add(self, line: int, text) -> None:
        where = f"JOBS line {line}: "
        if isinstance(text, Exception):
            raise JobError(f"{where}{text}")
        job = parse_job(text, self.actions, where)
        name = None if job.get("name") is None else check_name(job["name"], where)
        merged = merge_defaults(self.cli, job)
        tokens = ["generate"]
        for dest, value in merged.items():
            tokens += _tokens(dest, value, self.actions[dest], where)
        try:
            ns = self.parser.parse_args(tokens + ["--out=job.png"])
        except JobError as exc:
            msg = str(exc)
            if "required" in msg:
                msg += " (give it on the batch command line or as a key of the job)"
            raise JobError(f"{where}{msg}") from None
        del ns.command
        try:
            key, name, ckey, models = self._check(ns, name)
        except JobError:
            raise
        except (ValueError, OSError) as exc:
            raise JobError(f"{where}{exc}") from None
        if name in self.names:
            other = self.names[name]
            what = "the same job as" if other.key == key else "the name of"
            raise JobError(f"{where}output {name}.png is already {what} line {other.line}; fix: give this job "
                           f"another \"name\"" + (" or drop the line" if other.key == key else ""))
        j = Job(line, name, vars(ns), key=key, config=ckey, loras=_digest(sorted(ns.lora)))
        self._model_checks.setdefault((j.config, j.loras), (line, models))
        self.names[name] = j
        self.jobs.append(j)

    def _check(self, ns, name):
        """Validate like ``generate`` (no weights read), make the job self-contained; (key, name, config, the
        arguments of :func:`check_models` for its model files and LoRAs)."""
        from .__main__ import validate_generate

        _absolute(ns)
        check = argparse.Namespace(**vars(ns))
        if self.remote and check.device == "cuda":
            check.device = "cpu"        # the driver may have no GPU: the workers check the device
        plan = validate_generate(check, check_out=False)
        if ns.prompt_file is not None:  # the text travels with the job (workers need not see the file)
            ns.prompt, ns.prompt_file = plan["prompt"], None
        params = {k: v for k, v in vars(ns).items() if k != "out"}
        name = name or "job-" + _digest(params)[:16]
        ns.out = os.path.join(self.out_dir, name + ".png")
        ckey = _digest({k: params[k] for k in MODEL_KEYS})
        if ckey not in self._model_prints:
            self._model_prints[ckey] = _fingerprint(plan["paths"].values())
        files = [p for p in (ns.image, ns.mask) if p is not None] + [lp for lp, _ in plan["loras"]]
        cpu = ns.device == "cpu" or (ns.device == "auto" and plan["device"].type == "cpu")
        key = _digest({"params": params, "model": self._model_prints[ckey],
                       "files": {p: _stat(p) for p in files}, "threads": self.threads if cpu else None})
        models = {k: plan[k] for k in ("paths", "dtype", "loras")}
        return key, name, ckey, (argparse.Namespace(variant=ns.variant), models)

    def read(self, path: str, skip_invalid: bool) -> None:
        for line, text in _read_lines(path):
            if not isinstance(text, Exception) and (not text.strip() or text.lstrip().startswith("#")):
                continue
            try:
                self.add(line, text)
            except JobError as exc:
                if not skip_invalid:
                    raise
                self.invalid.append({"line": line, "status": "invalid", "error": str(exc)})
        self.check_models(skip_invalid)
        if not self.jobs and not self.invalid:
            raise ValueError(f"JOBS {path}: no job (every line is blank or a # comment); fix: one JSON object per "
                             f"line, e.g. {{\"prompt\": \"a cat\", \"seed\": 1}}")

    def check_models(self, skip_invalid: bool) -> None:
        """``generate``'s header checks (each model file is what its slot expects; every LoRA read and matched
        against the DiT's layers, built on ``meta``) once per (configuration, LoRA set), before anything loads.
        A failure names the first JOBS line of that set; with ``skip_invalid`` every job of it is invalid."""
        from .__main__ import check_models

        bad = {}
        for group, (line, (args, plan)) in self._model_checks.items():
            try:
                check_models(args, dict(plan))
            except (ValueError, OSError) as exc:
                if not skip_invalid:
                    raise JobError(f"JOBS line {line}: {exc}") from None
                bad[group] = (line, str(exc))
        self._model_checks.clear()
        if bad:
            for j in self.jobs:
                if (j.config, j.loras) in bad:
                    line, msg = bad[(j.config, j.loras)]
                    also = "" if line == j.line else f" (the model files and LoRAs of JOBS line {line})"
                    self.invalid.append({"line": j.line, "status": "invalid", "error": f"JOBS line {j.line}: {msg}"
                                                                                        f"{also}"})
            self.jobs = [j for j in self.jobs if (j.config, j.loras) not in bad]
            self.invalid.sort(key=lambda r: r["line"])


# ---- the order of work -----------------------------------------------------------------------------------


class JobQueue:
    """Pending jobs by (model configuration, LoRA set), in order of first appearance; a worker takes the next job
    of what it has loaded, so each configuration loads once per worker and LoRAs switch rarely."""

    def __init__(self, jobs):
        self.groups: collections.OrderedDict = collections.OrderedDict()
        for j in jobs:
            self.groups.setdefault((j.config, j.loras), collections.deque()).append(j)

    def __len__(self):
        return sum(len(d) for d in self.groups.values())

    def take(self, current=None):
        """The next job for a worker holding ``current`` = (config, loras) (None: nothing loaded)."""
        if current is not None:
            for want in (lambda g: g == current, lambda g: g[0] == current[0]):
                for g, d in self.groups.items():
                    if d and want(g):
                        return d.popleft()
        for d in self.groups.values():
            if d:
                return d.popleft()
        return None

    def put_back(self, job):
        self.groups.setdefault((job.config, job.loras), collections.deque()).appendleft(job)


# ---- one worker: a loaded pipeline, one job after another ------------------------------------------------


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Holds one loaded pipeline (the last configuration used) and renders jobs; the same class runs in-process
    and inside each Ray actor."""

    def __init__(self, threads: int | None = None, name: str | None = None):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.name = name or worker_name()
        self.pipe = None
        self._current = None
        self.load_key = None
        self.lora_key = None
        self.loads = 0
        self.lora_switches = 0

    @property
    def current(self):
        return self._current if self.pipe is not None else None

    def _load(self, ns, plan):
        import gc

        from .pipeline import LensPipeline

        self.pipe = None
        gc.collect()
        paths = plan["paths"]
        self.pipe = LensPipeline.from_pretrained(
            {c: paths[c] for c in ("transformer", "text_encoder", "vae", "tokenizer")}, dtype=plan["dtype"],
            device=plan["device"], offload=ns.offload, variant=ns.variant, fp8=ns.fp8, progress=False,
            loras=plan["loras"], enhance=plan["enhance"], memory=ns.memory)
        self.loads += 1

    def run(self, job: Job, write_dir: str | None, keep_png: bool = False) -> dict:
        """Render ``job``; write ``write_dir/<name>.png`` (None: not written) and return its manifest fields
        (``png``: the file's bytes when ``keep_png``). Errors propagate (see :meth:`run_safe`)."""
        from .__main__ import png_bytes, render_image, validate_generate

        t0 = time.perf_counter()
        ns = argparse.Namespace(**job.args)
        plan = validate_generate(ns, check_out=False)
        load_key = _digest([sorted(plan["paths"].items()), str(plan["dtype"]), str(plan["device"]), ns.offload,
                            ns.fp8, ns.variant, ns.memory])
        loras = [(os.path.abspath(p), s) for p, s in plan["loras"]]
        timings = {}
        if self.pipe is None or load_key != self.load_key:
            t = time.perf_counter()
            self._load(ns, plan)
            self.load_key, self.lora_key = load_key, loras
            timings["load_s"] = time.perf_counter() - t
        elif loras != self.lora_key:
            t = time.perf_counter()
            self.lora_key = None          # a failed switch leaves the DiT without LoRAs: never the old set
            self.pipe.set_loras(plan["loras"])
            self.lora_key = loras
            self.lora_switches += 1
            timings["lora_s"] = time.perf_counter() - t
        self._current = (job.config, job.loras)
        e = plan["enhance"]
        self.pipe.enhance_options = (dict(e) if isinstance(e, dict) else {}) if e else None
        t = time.perf_counter()
        image, params = render_image(self.pipe, ns, plan, 0, out=os.path.basename(ns.out))
        timings["image_s"] = time.perf_counter() - t
        t = time.perf_counter()
        data = png_bytes(image, params)
        timings["png_s"] = time.perf_counter() - t
        if write_dir is not None:
            t = time.perf_counter()
            write_output(os.path.join(write_dir, job.output), data, job.replace)
            timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        rec = {"status": "ok", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
               "seed": params["seed"], "batch_index": params["batch_index"], "width": params["width"],
               "height": params["height"], "steps": params["steps"], "cfg": params["cfg"],
               "dtype": params["dtype"], "device": params["device"],
               "timings": {k: round(v, 4) for k, v in timings.items()}, "worker": self.name}
        if plan["enhance"]:
            rec["enhanced_prompt"] = params["prompt"]
        if keep_png:
            rec["png"] = data
        return rec

    def run_safe(self, job: Job, write_dir: str | None, keep_png: bool = False) -> dict:
        """:meth:`run`, a failing job turned into a ``failed`` record (the worker goes on with the next one)."""
        t0 = time.perf_counter()
        try:
            return self.run(job, write_dir, keep_png)
        except MemoryError:
            self.pipe = None              # free what can be freed; the next job reloads
            return {"status": "failed", "error": "out of memory", "worker": self.name,
                    "timings": {"total_s": round(time.perf_counter() - t0, 4)}}
        except Exception as exc:          # noqa: BLE001 - any job error is recorded, the run goes on
            return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "worker": self.name,
                    "timings": {"total_s": round(time.perf_counter() - t0, 4)}}


def write_output(path: str, data: bytes, replace: bool) -> None:
    """Write a job's PNG atomically. Without ``replace`` an existing file is kept: it is fine when it already
    holds exactly these bytes (a run killed between the rename and its manifest record), else the job fails."""
    from .__main__ import write_atomic

    try:
        write_atomic(path, data, replace=replace)
    except FileExistsError:
        try:
            with open(path, "rb") as f:
                old = f.read(len(data) + 1)
        except OSError:
            old = None
        if old == b"" and os.path.isfile(path):   # the empty placeholder of a write killed half-way
            write_atomic(path, data)
        elif old != data:
            raise FileExistsError(f"{path}: a file of that name exists and no batch run into this folder wrote it "
                                  f"(no manifest record); kept as it is; fix: move it away, give the job another "
                                  f"\"name\", or pass --overwrite") from None


# ---- manifest, resume ------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Manifest:
    """DIR/manifest.jsonl: appended (and flushed to disk) as each job ends; compacted to one line per job when
    the run ends. Reading keeps the last record per output name and ignores a cut-off last line."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, MANIFEST)
        self.previous: dict = {}
        self.damaged = 0
        if os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        self.damaged += 1
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("name"), str):
                        self.previous[rec["name"]] = rec
        self.records: dict = {}
        self._f = None

    def done(self, job: Job, out_dir: str) -> dict | None:
        """The earlier ``ok`` record of ``job`` if its output is still the file it wrote, else None."""
        rec = self.previous.get(job.name)
        if not rec or rec.get("status") != "ok" or rec.get("key") != job.key:
            return None
        path = os.path.join(out_dir, job.output)
        try:
            if os.path.getsize(path) != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
                return None
        except OSError:
            return None
        return rec

    def append(self, rec: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if "name" in rec:
            self.records[rec["name"]] = rec

    def compact(self, jobs, invalid) -> None:
        """One line per job of this run (JOBS order), the invalid lines, then earlier records of other outputs."""
        from .__main__ import write_atomic

        if self._f is not None:
            self._f.close()
            self._f = None
        names = {j.name for j in jobs}
        lines = [self.records[j.name] for j in jobs if j.name in self.records]
        lines += invalid
        lines += [r for n, r in self.previous.items() if n not in names]
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8"))


def record(job: Job, res: dict) -> dict:
    rec = {"line": job.line, "name": job.name, "key": job.key}
    if res.get("status") == "ok":
        rec["output"] = job.output
    rec.update({k: v for k, v in res.items() if k != "png"})
    rec["attempts"] = max(job.attempts, 1)
    rec["finished"] = round(time.time(), 3)          # when this process recorded it (Unix time)
    return rec


class Interrupt:
    """Ctrl-C: the first finishes the image(s) in progress and stops; the second abandons them at once."""

    def __init__(self, write):
        self.requested = False
        self._write = write
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:                 # not the main thread: Ctrl-C keeps its default meaning
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._write("Ctrl-C: finishing the image in progress, then stopping (Ctrl-C again abandons it)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def remove_temporaries(out_dir: str) -> int:
    """Remove temporary files of :func:`write_atomic` left by a killed run (the lock is held: none is live)."""
    from .__main__ import TMP_SUFFIX

    n = 0
    for name in os.listdir(out_dir):
        if name.startswith(".") and name.endswith(TMP_SUFFIX):
            try:
                os.unlink(os.path.join(out_dir, name))
                n += 1
            except OSError:
                pass
    return n


def _lock(out_dir: str):
    try:
        import fcntl
    except ImportError:                    # Windows: no advisory lock
        return None
    f = open(os.path.join(out_dir, LOCK), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OSError(f"--out {out_dir}: another batch run is writing into this folder; fix: wait for it to end, "
                      f"or choose another --out") from None
    return f


def _check_out_dir(out_dir: str) -> None:
    from .__main__ import probe_folder

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out {out_dir}: is a file; fix: name a folder (created if missing)")
    probe_folder(out_dir, f"--out {out_dir}")


def _check_positive(value, flag: str):
    if value is not None and (value < 1 or value > 4096):
        raise ValueError(f"{flag}: expected a number in [1, 4096], found {value}")


# ---- the run ---------------------------------------------------------------------------------------------


class Stats:
    def __init__(self):
        self.done = self.skipped = self.failed = 0
        self.loads = self.lora_switches = 0
        self.image_s = 0.0
        self.slots = 1                     # workers running at once (for the per-image overhead)
        self.workers: set = set()


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="batch", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def run_batch(args) -> int:
    """The ``batch`` command (see the module doc); returns the exit status."""
    import torch

    for dest, why in REFUSED_KEYS.items():
        if getattr(args, dest, False):
            raise ValueError(f"--{dest.replace('_', '-')}: not an option of batch: {why}")
    for flag in ("workers", "cpus_per_worker", "threads"):
        _check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.ray is None:
        for flag, given in (("--workers", args.workers is not None), ("--cpus-per-worker", args.cpus_per_worker
                                                                       is not None), ("--gather", args.gather)):
            if given:
                raise ValueError(f"{flag}: only used with --ray; fix: add --ray, or drop {flag}")
    ray_mod = None
    if args.ray is not None:
        from .batch_ray import import_ray

        try:
            ray_mod = import_ray()         # a clear "pip install" error before anything else
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
    threads = args.threads or torch.get_num_threads()
    out_dir = os.path.abspath(args.out)
    _check_out_dir(out_dir)
    jobs = JobList(args, out_dir, threads, remote=args.ray is not None)
    jobs.read(args.jobs, args.skip_invalid)
    for rec in jobs.invalid:
        print(f"skipped invalid {rec['error']}", file=sys.stderr)
    lock = _lock(out_dir)
    try:
        return _run(args, jobs, out_dir, threads, ray_mod)
    finally:
        if lock is not None:
            lock.close()


def _run(args, jobs: JobList, out_dir: str, threads: int, ray_mod) -> int:
    remove_temporaries(out_dir)
    manifest = Manifest(out_dir)
    stats = Stats()
    todo = []
    for j in jobs.jobs:
        j.replace = bool(getattr(args, "overwrite", False)) or j.name in manifest.previous
        rec = manifest.done(j, out_dir)
        if rec is not None:
            manifest.records[j.name] = dict(rec, line=j.line)
            stats.skipped += 1
        else:
            todo.append(j)
    if manifest.damaged:
        print(f"note: {manifest.damaged} unreadable line(s) in {manifest.path} ignored (a run killed while "
              f"writing); those jobs run again", file=sys.stderr)
    t0 = time.perf_counter()
    bar = _bar(len(todo)) if todo else None
    def write(text):
        if bar is not None:
            bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)
    if stats.skipped:
        write(f"{stats.skipped} job(s) already done in {out_dir} (output matches the manifest): skipped")

    def finished(job, res):
        rec = record(job, res)
        manifest.append(rec)
        if rec["status"] == "ok":
            stats.done += 1
            stats.image_s += rec["timings"].get("image_s", 0.0)
        else:
            stats.failed += 1
            write(f"failed: JOBS line {job.line} ({job.name}): {rec['error']}")
        stats.workers.add(rec.get("worker"))
        if bar is not None:
            bar.update(1)

    interrupted = False
    try:
        with Interrupt(write) as stop:
            try:
                if ray_mod is not None:
                    from .batch_ray import run_on_ray

                    run_on_ray(ray_mod, args, JobQueue(todo), out_dir, threads, finished, stop, stats, write)
                else:
                    _run_local(JobQueue(todo), out_dir, threads, finished, stop, stats, write)
            except KeyboardInterrupt:
                interrupted = True
            interrupted = interrupted or stop.requested
    finally:
        if bar is not None:
            bar.close()
        manifest.compact(jobs.jobs, jobs.invalid)
        remove_temporaries(out_dir)
    elapsed = time.perf_counter() - t0
    left = len(jobs.jobs) - stats.done - stats.skipped - stats.failed
    bad = stats.failed + len(jobs.invalid)
    rate = stats.done / elapsed if elapsed > 0 and stats.done else 0.0
    overhead = (stats.slots * elapsed - stats.image_s) / stats.done if stats.done else 0.0
    line = (f"batch: {len(jobs.jobs) + len(jobs.invalid)} job(s): {stats.done} done, {stats.skipped} skipped, "
            f"{stats.failed} failed, {len(jobs.invalid)} invalid" + (f", {left} not run" if left else "") +
            f"; {stats.loads} model load(s), {stats.lora_switches} LoRA switch(es), "
            f"{len(stats.workers - {None})} worker(s); {elapsed:.1f} s")
    if stats.done:
        line += (f", {rate:.3g} images/s; per image {stats.image_s / stats.done:.3g} s in the model, {overhead:.3g} "
                 f"s of worker time outside it (loads, files, scheduling)")
    print(line, file=sys.stderr)
    print(f"manifest: {manifest.path}", file=sys.stderr)
    if interrupted:
        print(f"interrupted: {left} job(s) not run; run the same command again to resume", file=sys.stderr)
        return 130
    return EXIT_FAILED + min(bad, EXIT_FAILED_CAP) if bad else 0


def _run_local(queue: JobQueue, out_dir, threads, finished, stop, stats, write) -> None:
    worker = Worker(threads)
    try:
        while len(queue) and not stop.requested:
            job = queue.take(worker.current)
            job.attempts += 1
            loads = worker.loads
            res = worker.run_safe(job, out_dir)
            if worker.loads != loads:
                write(f"loaded the model configuration of JOBS line {job.line}")
            finished(job, res)
    finally:
        stats.loads += worker.loads
        stats.lora_switches += worker.lora_switches
