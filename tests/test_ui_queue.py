"""The queue folder and the run-folder listing, on files only (no model): order, moves, recovery, taken names."""

import os

import pytest

from lib_lora.train.config import TrainConfig
from lib_lora.train.run_folder import CONFIG_FILE, LOSS_FILE, STATE_FILE
from lib_lora.ui.queue import JobQueue, NotFoundError, list_runs, name_taken


def config(name: str, **changes) -> TrainConfig:
    return TrainConfig(train_data_dir="/data", output_name=name, **changes)


def names(queue) -> list[str]:
    return [job.name for job in (queue if isinstance(queue, list) else queue.jobs())]


def test_jobs_are_toml_files_in_order_and_move_by_exchanging_numbers(tmp_path):
    queue = JobQueue(tmp_path)
    assert not (tmp_path / "queue").exists()  # nothing is written until a job is added
    for name in "abcd":
        queue.add(config(name, network_dim=8))
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == ["0001-a.toml", "0002-b.toml", "0003-c.toml", "0004-d.toml"]
    assert TrainConfig.from_toml(tmp_path / "queue" / "0002-b.toml") == config("b", network_dim=8)
    assert names(queue.move("d", -2)) == ["a", "d", "b", "c"]
    assert names(queue.move("a", 10)) == ["d", "b", "c", "a"]  # clamped to the end
    assert names(queue.move("d", -1)) == ["d", "b", "c", "a"]
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == ["0001-d.toml", "0002-b.toml", "0003-c.toml", "0004-a.toml"]
    queue.remove("b")
    assert names(JobQueue(tmp_path)) == ["d", "c", "a"]  # what a restart reads
    with pytest.raises(NotFoundError, match="'b'"):
        queue.remove("b")


def test_a_taken_job_leaves_the_list_and_comes_back_unless_its_run_began(tmp_path):
    queue = JobQueue(tmp_path)
    for name in "abc":
        queue.add(config(name))
    first = queue.take()
    assert first.name == "a" and first.path.name == "0001-a.toml.started" and names(queue) == ["b", "c"]
    queue.add(config("d"))
    assert queue.jobs()[-1].number == 4  # numbers never reuse the started job's
    queue.put_back(first)
    assert names(queue) == ["a", "b", "c", "d"]

    queue.take(), queue.take()  # a crash while a and b run; b's run folder exists, a's does not
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CONFIG_FILE).write_text(config("b").to_toml())
    assert names(JobQueue(tmp_path)) == ["a", "c", "d"]
    assert not list((tmp_path / "queue").glob("*.started"))


def test_a_file_that_no_longer_loads_is_set_aside_with_a_note(tmp_path):
    queue = JobQueue(tmp_path)
    queue.add(config("a"))
    (tmp_path / "queue" / "0002-b.toml").write_text('resolution = "100"\n')
    assert names(queue) == ["a"]
    assert (tmp_path / "queue" / "0002-b.toml.invalid").exists()
    assert queue.problems and queue.problems[0].startswith("0002-b.toml.invalid: set aside") and "resolution:" in queue.problems[0]


def test_a_name_is_taken_by_a_lora_file_a_run_folder_the_running_or_a_queued_job(tmp_path):
    lora, runs = tmp_path / "lora", tmp_path / "runs"
    lora.mkdir()
    (runs / "ran").mkdir(parents=True)
    (runs / "ran" / CONFIG_FILE).write_text("")
    (lora / "made-000002.safetensors").write_bytes(b"")
    (lora / "[odd].safetensors").write_bytes(b"")
    taken = lambda name, **kw: name_taken(config(name, **kw), lora_dir=lora, runs_dir=runs, running="now", queued=["next"])  # noqa: E731
    assert taken("free") is None
    assert taken("now") == "output_name: 'now' is the name of the run in progress; choose another output_name"
    assert taken("next") == "output_name: 'next' is already queued; choose another output_name or remove that job"
    assert taken("ran").startswith(f"output_name: 'ran' has a run folder, {runs / 'ran'}")
    assert taken("made") == f"output_name: {lora / 'made-000002.safetensors'} already exists; choose another output_name or set overwrite"
    assert taken("made", overwrite=True) is None
    assert taken("[odd]").startswith(f"output_name: {lora / '[odd].safetensors'}")  # glob characters are literal
    assert taken("made", output_dir=str(tmp_path / "elsewhere")) is None


def test_run_folders_report_their_status_from_their_files(tmp_path):
    lora, runs = tmp_path / "lora", tmp_path / "runs"
    lora.mkdir()
    for name, steps, state, final in (("done", 8, True, True), ("stopped", 3, True, False), ("early", 0, False, False), ("live", 2, True, False)):
        folder = runs / name
        folder.mkdir(parents=True)
        (folder / CONFIG_FILE).write_text(config(name).to_toml())
        (folder / LOSS_FILE).write_text("step,epoch,loss\n" + "".join(f"{i},1,0.1\n" for i in range(1, steps + 1)))
        if state:
            (folder / STATE_FILE).write_bytes(b"")
        if final:
            (lora / f"{name}.safetensors").write_bytes(b"")
            os.utime(folder / STATE_FILE, (1, 1))  # the final file comes after the last state
    (runs / "queue").mkdir()  # the queue folder is not a run
    found = {run.name: (run.status, run.step, run.final_path) for run in list_runs(runs, lora, running="live")}
    assert found == {"done": ("finished", 8, lora / "done.safetensors"), "stopped": ("interrupted", 3, None),
                     "early": ("incomplete", 0, None), "live": ("running", 2, None)}
