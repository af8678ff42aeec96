"""The ``batch --ray`` driver loop (:func:`lens_core.batch_ray._drive`) against a scripted fake of Ray: lost
workers, restarts and the start timeout, on a virtual clock (no cluster, no model; Ray's exception classes only).

Each fake call is ready ``delay`` virtual seconds after it was sent; ``ray.wait`` jumps the clock to the next ready
call. The reference for each case is the outcome the design states (ARCHITECTURE.md "Batch and clusters"): every
job recorded exactly once, a lost worker's jobs retried once it answers again."""
from __future__ import annotations

import types

import pytest

ray_exceptions = pytest.importorskip("ray.exceptions")

from lens_core import batch_ray  # noqa: E402
from lens_core.batch import Job, JobQueue, Stats  # noqa: E402

LOST = ray_exceptions.RayActorError(error_msg="the actor died (test)")
GONE = ray_exceptions.ActorDiedError()
RESTARTING = ray_exceptions.ActorUnavailableError("restarting (test)", None)


class Ref:
    def __init__(self, ready_at, outcome, seq):
        self.ready_at, self.outcome, self.seq = ready_at, outcome, seq


class FakeRay:
    """``wait``/``get``/``cluster_resources`` over :class:`Ref` objects, on a virtual clock."""

    def __init__(self):
        self.now = 0.0
        self.seq = 0

    def ref(self, delay, outcome):
        self.seq += 1
        return Ref(self.now + delay, outcome, self.seq)

    def wait(self, refs, num_returns=1, timeout=None):
        first = min(refs, key=lambda r: (r.ready_at, r.seq))
        self.now = max(self.now, first.ready_at)
        return [first], [r for r in refs if r is not first]

    def get(self, ref):
        if isinstance(ref.outcome, Exception):
            raise ref.outcome
        return ref.outcome

    def cluster_resources(self):
        return {"CPU": 1.0}


class Method:
    def __init__(self, ray, script, log):
        self.ray, self.script, self.log = ray, list(script), log

    def remote(self, *args):
        delay, outcome = self.script.pop(0)
        if callable(outcome):
            outcome = outcome(*args)
        self.log.append(args)
        return self.ray.ref(delay, outcome)


def ok(job, write_dir, gather):
    return {"status": "ok", "worker": "fake:1", "worker_loads": 1, "worker_lora_switches": 0, "job": job.name}


def drive(fake, pings, runs, n_jobs):
    actor = types.SimpleNamespace(ping=Method(fake, pings, []), run=Method(fake, runs, []))
    jobs = [Job(i + 1, f"j{i + 1}", {}, config="A", loras="x") for i in range(n_jobs)]
    done = []
    batch_ray._drive(fake, [actor], JobQueue(jobs), None, False, lambda job, res: done.append((job, res)),
                     types.SimpleNamespace(requested=False), Stats(), lambda text: None, "/nowhere")
    return done


@pytest.fixture
def fake(monkeypatch):
    f = FakeRay()
    monkeypatch.setattr(batch_ray, "time", types.SimpleNamespace(monotonic=lambda: f.now))
    return f


def test_last_worker_restarting_late_in_a_run_is_waited_for(fake):
    """900 s into the run the only worker is lost (both its calls fail); Ray restarts it (300 s, then it
    answers): the two jobs run again on it, each recorded once as ok — not a start timeout."""
    pings = [(0, "w"), (300, RESTARTING), (200, "w")]
    runs = [(900, ok), (901, LOST), (2, LOST), (1, ok), (1, ok)]
    done = drive(fake, pings, runs, 3)
    assert sorted((j.name, r["status"], j.attempts) for j, r in done) == [
        ("j1", "ok", 1), ("j2", "ok", 2), ("j3", "ok", 2)]
    assert fake.now == 1402          # restarted at 1401, both jobs 1 s each (in flight together)


def test_no_worker_for_the_start_timeout_still_gives_up(fake):
    """A worker that never answers: TimeoutError naming the start, after START_TIMEOUT_S (not before)."""
    pings = [(400, RESTARTING)] * 3
    with pytest.raises(TimeoutError, match="no worker started within 600 s"):
        drive(fake, pings, [], 1)
    assert 600 < fake.now <= 1200


def test_job_in_flight_on_a_worker_gone_for_good_is_recorded(fake):
    """The only worker fails one call, its re-ping says it is gone for good while its second call is still in
    flight: that call's result is still recorded (ok), the failed job is recorded as failed — each once."""
    pings = [(0, "w"), (1, GONE)]
    runs = [(1, LOST), (10, ok)]
    done = drive(fake, pings, runs, 2)
    assert [(j.name, r["status"]) for j, r in done] == [("j2", "ok"), ("j1", "failed")]
    assert "no Ray worker left" in done[1][1]["error"]
