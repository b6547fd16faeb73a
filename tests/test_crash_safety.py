"""A run killed with SIGKILL resumes to the very file an unkilled run writes; a run folder is trained by one
process at a time, and the lock of a process that died is taken over with a notice."""

import csv
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.locking import FolderLockedError, folder_lock
from lib_lora.train.config import TrainConfig
from lib_lora.train.run_folder import LOCK_FILE, RunFolder

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # 4 images x 3 epochs, batch 1
# state every 3 steps (with the step-named files) and at each epoch's end; dropout, flips and caption
# shuffles draw from every random stream the state has to carry over
TRAIN_FLAGS = ["--resolution", "64", "64", "--network_dim", "4", "--max_train_epochs", "3", "--save_every_n_steps", "3",
               "--network_dropout", "0.1", "--flip_aug", "--shuffle_caption", "--learning_rate", "1e-3", "--seed", "7", "--output_name", "k"]
HOLD_A_LOCK = """
import sys, time
from pathlib import Path
from lib_lora.locking import folder_lock
with folder_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    time.sleep(120)
"""


def lib_lora(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "lib_lora", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    return output


def logged_steps(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "loss.csv").read_text().splitlines()[1:] if line.endswith(","))  # a whole row
    except FileNotFoundError:
        return 0


def kill_at(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    """SIGKILL once `step` steps are logged: during step+1, or in the middle of a save."""
    while logged_steps(run_dir) < step:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.01)
    process.kill()
    process.wait()


def loss_rows(run_dir: Path) -> list[tuple[str, ...]]:
    """step, epoch, loss, avg_loss, lr of each row (not it/s, a timing)."""
    with open(run_dir / "loss.csv", newline="") as f:
        return [tuple(row[:5]) for row in csv.reader(f)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data") / "d", n_images=4, repeats=1)


def test_a_run_killed_at_a_random_step_resumes_to_the_same_file(dataset, tmp_path):
    kill_step = random.Random(19).randint(5, STEPS - 2)  # after a state save; before the last step, which ends the run
    straight = lib_lora("train", "--train_data_dir", str(dataset), "--out-dir", str(tmp_path / "a"), *TRAIN_FLAGS)
    killed = lib_lora("train", "--train_data_dir", str(dataset), "--out-dir", str(tmp_path / "b"), *TRAIN_FLAGS)
    run_dir = tmp_path / "b" / "runs" / "k"
    kill_at(killed, run_dir, kill_step)
    assert (run_dir / "state.pt").exists() and not (tmp_path / "b" / "lora" / "k.safetensors").exists()
    finish(straight)

    output = finish(lib_lora("train", "--resume", str(run_dir), "--out-dir", str(tmp_path / "b")))
    assert f"took over the lock of process {killed.pid}" in output

    a, b = load_file(tmp_path / "a" / "lora" / "k.safetensors"), load_file(tmp_path / "b" / "lora" / "k.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), f"killed after step {kill_step}"
    assert loss_rows(run_dir) == loss_rows(tmp_path / "a" / "runs" / "k")  # each step once, with the same loss and average
    assert {p.name for p in run_dir.iterdir()} == {"base_model.json", "config.toml", LOCK_FILE, "loss.csv", "samples", "state.pt"}  # no temp file


def test_a_live_run_folder_is_refused_and_a_dead_ones_lock_is_taken_over(dataset, tmp_path):
    run_dir, lora_dir = tmp_path / "run", tmp_path / "lora"
    RunFolder.create(run_dir, TrainConfig(train_data_dir=str(dataset), output_name="k"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_LOCK, str(run_dir), LOCK_FILE], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderLockedError, match=f"{run_dir} is in use by process {holder.pid}"):
            with RunFolder.claimed(run_dir, notice=print):
                pass
        resume = lib_lora("train", "--resume", str(run_dir), "--out-dir", str(tmp_path / "out"))
        assert resume.communicate(timeout=120)[0].endswith(f"error: {run_dir} is in use by process {holder.pid} (it holds {run_dir / LOCK_FILE}); "
                                                           "wait for that run to finish or stop it, then try again\n")
        assert resume.returncode == 2
    finally:
        holder.kill()
        holder.wait()
    (run_dir / "latents").mkdir()
    leftovers = [run_dir / f".state.pt.{holder.pid}.tmp", run_dir / "latents" / ".tmpX3k9Qa", lora_dir / f".k-000002.safetensors.{holder.pid}.tmp"]
    others = [lora_dir / ".k-000002.safetensors.1.tmp", lora_dir / "k.safetensors"]  # another process's write, a finished file
    for path in leftovers + others:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    notices = []
    with RunFolder.claimed(run_dir, notices.append, lora_dir):
        with pytest.raises(FolderLockedError, match=f"in use by process {os.getpid()}"):  # a second run in this process too
            with folder_lock(run_dir, LOCK_FILE):
                pass
    assert notices == [f"{run_dir}: took over the lock of process {holder.pid}, which ended without releasing it (killed or crashed); "
                       "removed 3 half-written temporary file(s)"]
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in others)
    with RunFolder.claimed(run_dir, notice=notices.append):  # released cleanly: no notice
        pass
    assert len(notices) == 1
