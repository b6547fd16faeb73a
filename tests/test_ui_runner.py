"""The background job the tab polls: events folded into state, interrupt, failures, ETA, HTML."""

import threading
from pathlib import Path

from lib_lora.train.config import ConfigError
from lib_lora.train.trainer import TrainEvent, TrainResult
from lib_lora.ui.runner import JobState, TrainingJob
from lib_lora.ui.status import duration, progress_html


class FakeHost:
    def __init__(self):
        self.interrupts = 0

    def interrupt(self):
        self.interrupts += 1


def fake_run(events, result=None, host=None, gate=None):
    def work(job):
        job.attach_host(host or FakeHost())
        for event in events:
            if gate is not None and event.kind == "step":
                gate.wait(5)
            job.on_event(event)
        return result or TrainResult(Path("runs/x"), Path("lora/x.safetensors"), events[-1].step, False, 0.5)
    return work


def test_events_become_state_and_log():
    events = [TrainEvent("start", total_steps=4, message="4 images x 1 repeats ..."),
              *(TrainEvent("step", s, 4, 1, 1.0 / s, 0.9 / s, 1e-3, 2.0) for s in range(1, 5)),
              TrainEvent("validation", 4, epoch=1, loss=0.3), TrainEvent("sample", 4, epoch=1, paths=[Path("s/e0001-00-0.png")]),
              TrainEvent("epoch", 4, 4, 1), TrainEvent("save", 4, epoch=1, paths=[Path("lora/x.safetensors")]),
              TrainEvent("done", 4, epoch=1, loss=0.25, paths=[Path("lora/x.safetensors")], message="finished")]
    job = TrainingJob(fake_run(events)).start()
    assert job.wait(5)
    state = job.snapshot()
    assert state.status == "finished" and state.step == 4 and state.total_steps == 4 and state.epoch == 1
    assert state.losses == [(s, 1.0 / s) for s in range(1, 5)] and state.validation == [(4, 0.3)]
    assert state.samples == [Path("s/e0001-00-0.png")] and state.saves == [Path("lora/x.safetensors")]
    assert state.plan.startswith("4 images") and state.result.final_path == Path("lora/x.safetensors")
    assert "plan: 4 images x 1 repeats ..." in state.log and "epoch 1 done at step 4" in state.log
    assert state.log[-1] == "finished: lora/x.safetensors" and not any(line.startswith("step") for line in state.log)
    assert "Finished" in progress_html(state) and "100%" in progress_html(state)


def test_interrupt_reaches_the_host_even_before_it_exists():
    host, gate = FakeHost(), threading.Event()
    attached = threading.Event()

    def work(job):
        attached.wait(5)
        job.attach_host(host)
        job.on_event(TrainEvent("start", total_steps=2))
        gate.wait(5)
        return TrainResult(Path("r"), Path("l-step.safetensors"), 1, True, 0.5)

    job = TrainingJob(work).start()
    assert job.interrupt() and job.snapshot().status == "stopping"
    attached.set()
    gate.set()
    job.wait(5)
    assert host.interrupts >= 2  # on attach, and again after the trainer's start (which clears the flag)
    assert job.snapshot().status == "interrupted" and not job.interrupt()


def test_failures_are_reported_not_raised():
    def bad_option(job):
        raise ConfigError("learning_rate: must be positive")

    def bug(job):
        raise KeyError("oops")

    for work, status, text in ((bad_option, "failed", "learning_rate: must be positive"), (bug, "failed", "KeyError: 'oops'")):
        job = TrainingJob(work).start()
        job.wait(5)
        state = job.snapshot()
        assert state.status == status and state.error == text and state.finished_at
        assert f"error: {text}" in state.log
    assert "Traceback" in "\n".join(state.log)  # an unexpected error keeps its traceback in the log
    never = TrainingJob.failed("resolution: 500 is not a positive multiple of 64")
    assert never.snapshot().status == "failed" and "resolution" in progress_html(never.snapshot())


def test_eta_from_the_pace_so_far():
    state = JobState(status="running", step=10, total_steps=40, started_at=100.0)
    assert state.elapsed(now=120.0) == 20.0 and state.eta(now=120.0) == 60.0
    assert JobState(status="finished", step=40, total_steps=40, started_at=1.0, finished_at=5.0).eta() is None
    html = progress_html(state, now=120.0)
    assert "step 10/40" in html and "ETA 1m 00s" in html and "25%" in html
    assert duration(None) == "\u2014" and duration(42) == "42s" and duration(185) == "3m 05s" and duration(3725) == "1h 02m"


def test_snapshots_are_copies():
    job = TrainingJob(fake_run([TrainEvent("step", 1, 2, 1, 0.5, 0.5, 1e-3, 1.0)]))
    job.on_event(TrainEvent("step", 1, 2, 1, 0.5, 0.5, 1e-3, 1.0))
    snap = job.snapshot()
    snap.losses.append((9, 9.0))
    assert job.snapshot().losses == [(1, 0.5)] and job.snapshot().version > 0
