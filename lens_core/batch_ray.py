"""``batch --ray``: the batch jobs on Ray actors, one model-holding worker per GPU (or per ``--cpus-per-worker``).

Design (ARCHITECTURE.md "Batch and clusters" gives the reasons): plain Ray actors fed from a bounded queue by
this driver, not Ray Data. Each actor is a :class:`lens_core.batch.Worker` (it keeps its pipeline loaded between
jobs and switches LoRAs in place); the driver keeps at most ``DEPTH`` jobs in flight per actor, picks for each
actor the next job of the configuration and LoRA set it holds (:class:`lens_core.batch.JobQueue`), and records
each result in the manifest the moment it arrives. A lost actor (process killed, node gone) fails its
in-flight calls with a ``RayActorError``: those jobs go back to the front of the queue (retried on whichever
worker is free, at most ``MAX_ATTEMPTS`` times), and the actor, restarted by Ray (``max_restarts``), is pinged
and gets work again once it answers. A job is recorded only from the one call that returned, so it appears
once in the manifest however often it was retried.

Ray is an optional extra (requirements-ray.txt, ``pip install lens-nodes[ray]``): it is imported only here,
only for ``--ray``; nothing in nodes/ imports this module.
"""
from __future__ import annotations

import os
import time

RAY_FIX = "pip install -r requirements-ray.txt (or: pip install 'lens-nodes[ray]')"
#: jobs in flight per actor: the next one waits on the worker while the current one renders
DEPTH = 2
#: restarts Ray grants a lost actor (a new process that loads the model again)
MAX_RESTARTS = 3
#: calls of one job before it is recorded as failed (a job that kills its worker each time)
MAX_ATTEMPTS = 3
#: object store of a local cluster started by --ray (jobs are small JSON, results at most a PNG each)
LOCAL_OBJECT_STORE_BYTES = 256 << 20
#: pings of a restarting actor that answer "unavailable" before it counts as gone
MAX_REPINGS = 100
#: how long the run may go with no worker answering and no job in flight (the first start, or the restart of
#: the last live worker) before it gives up
START_TIMEOUT_S = 600.0


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"--ray: Ray is not installed ({exc}); fix: {RAY_FIX}") from None
    return ray


class BatchActor:
    """The Ray actor: a :class:`lens_core.batch.Worker` in its own process (wrapped by ``ray.remote`` at run time,
    so this module imports without Ray)."""

    def __init__(self, threads):
        from lens_core.batch import Worker

        self.worker = Worker(threads)

    def ping(self) -> str:
        return self.worker.name

    def run(self, job, write_dir, keep_png):
        res = self.worker.run_safe(job, write_dir, keep_png)
        res["worker_loads"] = self.worker.loads
        res["worker_lora_switches"] = self.worker.lora_switches
        return res


def _package_env() -> dict:
    """Workers import lens_core from where this process does (the same path must exist on every node; or
    install the pack there)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def connect(ray, address: str, write):
    """Attach to (or start) the cluster; returns True when this call started or connected it (so shuts it down)."""
    if ray.is_initialized():
        if address not in ("local", "auto"):
            write(f"note: this process is already attached to a Ray cluster; --ray {address} is not used")
        return False
    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="warning")
    if address == "local":
        ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    else:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConnectionError(f"--ray {address}: cannot connect to a Ray cluster ({exc}); fix: start one "
                                  f"('ray start --head' on the head node, 'ray start --address HEAD:6379' on the "
                                  f"others), or pass --ray alone for a local cluster") from None
    return True


def plan_workers(ray, args, threads: int, write) -> tuple[int, dict]:
    """(number of actors, their resource options): one per GPU, else one per --cpus-per-worker CPUs."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = int(res.get("CPU", 0))
    device = getattr(args, "device", "auto")
    if gpus and device != "cpu":
        n = args.workers or gpus
        opts = {"num_gpus": 1, "num_cpus": args.cpus_per_worker or 1}
        if n > gpus:
            write(f"note: --workers {n} > {gpus} GPU(s) in the cluster: the others start when GPUs join")
    else:
        cpw = args.cpus_per_worker or 1
        if device == "cuda":
            raise ValueError("--device cuda with --ray: the cluster has no GPU (ray.cluster_resources() lists "
                             "none); fix: --device cpu, or add GPU nodes")
        n = args.workers or max(1, cpus // cpw)
        opts = {"num_cpus": cpw}
        if n * cpw > cpus:
            write(f"note: {n} workers × {cpw} CPUs > {cpus} CPUs in the cluster: the others start when nodes join")
        if threads > cpw:
            write(f"note: --threads {threads} > --cpus-per-worker {cpw}: each worker runs {threads} threads on {cpw} "
                  f"reserved CPU(s) (images stay identical to any {threads}-thread run; set both equal for speed)")
    return n, opts


def run_on_ray(ray, args, queue, out_dir: str, threads: int, finished, stop, stats, write) -> None:
    """Run every job of ``queue`` on Ray actors; ``finished(job, result)`` records each one (on this process)."""
    started = connect(ray, args.ray, write)
    actors = []
    try:
        n, opts = plan_workers(ray, args, threads, write)
        stats.slots = n
        cls = ray.remote(BatchActor)
        actors = [cls.options(max_restarts=MAX_RESTARTS, max_task_retries=0, runtime_env=_package_env(),
                              **opts).remote(threads) for _ in range(n)]
        write(f"ray: {n} worker(s) {opts}, {DEPTH} job(s) in flight each, outputs "
              f"{'gathered here' if args.gather else 'written by the workers into ' + out_dir}")
        _drive(ray, actors, queue, None if args.gather else out_dir, args.gather, finished, stop, stats, write,
               out_dir)
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:             # noqa: BLE001 - already gone
                pass
        if started:
            ray.shutdown()


def _drive(ray, actors, queue, write_dir, gather, finished, stop, stats, write, out_dir):
    from .batch import write_output
    from ray.exceptions import ActorUnavailableError, RayError, RayTaskError

    inflight = {}                        # ref → (actor index, job)
    pings = {a.ping.remote(): i for i, a in enumerate(actors)}   # actors not (yet / again) known alive
    alive = set()
    count = [0] * len(actors)
    repings = [0] * len(actors)
    holds = [None] * len(actors)         # (config, loras) of the last job sent to each actor
    loads = {}                           # worker name → (model loads, LoRA switches) so far
    idle_since = time.monotonic()        # since when no worker was alive and no call in flight
    answered = False                     # some worker answered a ping (the run has started)

    def fill():
        for i in sorted(alive):
            while count[i] < DEPTH and len(queue) and not stop.requested:
                job = queue.take(holds[i])
                job.attempts += 1
                holds[i] = (job.config, job.loras)
                inflight[actors[i].run.remote(job, write_dir, gather)] = (i, job)
                count[i] += 1

    try:
        while inflight or (len(queue) and not stop.requested):
            if alive or inflight:
                idle_since = time.monotonic()
            if not alive and not pings and not inflight:
                for job in iter(lambda: queue.take(), None):
                    finished(job, {"status": "failed", "error": "no Ray worker left (every worker was lost more "
                                                                "than its restarts allow)"})
                break
            if not alive and not inflight and time.monotonic() - idle_since > START_TIMEOUT_S:
                what = "came back" if answered else "started"
                raise TimeoutError(f"--ray: no worker {what} within {START_TIMEOUT_S:.0f} s (cluster resources "
                                   f"{ray.cluster_resources()}); fix: check the cluster (ray status) or lower "
                                   f"--workers / --cpus-per-worker")
            fill()
            ready, _ = ray.wait(list(inflight) + list(pings), num_returns=1, timeout=0.25)
            for ref in ready:
                if ref in pings:
                    i = pings.pop(ref)
                    try:
                        ray.get(ref)
                        alive.add(i)
                        answered = True
                    except ActorUnavailableError:     # still restarting: ask again
                        repings[i] += 1
                        if repings[i] <= MAX_REPINGS:
                            pings[actors[i].ping.remote()] = i
                    except RayError:
                        write(f"ray: worker {i} is gone for good (restarts used up)")
                    continue
                i, job = inflight.pop(ref)
                count[i] -= 1
                try:
                    res = ray.get(ref)
                except RayTaskError as exc:       # raised by the job's code itself (run_safe lets none through)
                    finished(job, {"status": "failed", "error": str(exc).strip()[-500:]})
                    continue
                except RayError as exc:           # the worker is gone: process killed, node lost, out of memory
                    holds[i] = None
                    if i in alive:
                        alive.discard(i)
                        pings[actors[i].ping.remote()] = i      # answers once Ray has restarted it
                    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    if job.attempts >= MAX_ATTEMPTS:
                        finished(job, {"status": "failed", "error": f"worker lost {job.attempts} times while "
                                                                    f"running this job (last: {reason}); the job "
                                                                    f"may crash its worker (e.g. out of memory)"})
                    else:
                        write(f"ray: worker {i} lost while running JOBS line {job.line}; retrying it elsewhere")
                        queue.put_back(job)
                    continue
                if res.get("status") == "ok" and gather:
                    try:
                        write_output(os.path.join(out_dir, job.output), res["png"], job.replace)
                    except OSError as exc:
                        res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "worker": res["worker"]}
                loads[res.get("worker")] = (res.pop("worker_loads", 0), res.pop("worker_lora_switches", 0))
                res["worker_index"] = i
                finished(job, res)
    finally:
        stats.loads += sum(v[0] for v in loads.values())
        stats.lora_switches += sum(v[1] for v in loads.values())
