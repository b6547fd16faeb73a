"""Data-parallel training (`torchrun --nproc_per_node N`): two gloo processes on the CPU follow one process's
loss curve with the same global batch and seed, and a run saved by two processes resumes in one."""

import csv
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from distributed_worker import run
from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.train.config import TrainConfig
from lib_lora.train.distributed import Distributed
from lib_lora.train.trainer import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir) -> list[float]:
    with open(run_dir / "loss.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row["loss"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint_path):
    root = tmp_path_factory.mktemp("ddp")
    data = make_lora_dataset(root / "data", concept="star", trigger="zkz", n_images=5, repeats=1, seed=0)
    # 5 images, global batch 2: batches of 2, 2 and 1, so one process's share of the last batch is empty
    values = dict(train_data_dir=str(data), resolution=(64, 64), train_batch_size=2, max_train_epochs=2, learning_rate=2e-3,
                  network_dim=4, network_alpha=4.0, output_name="ddp", seed=11, shuffle_caption=True, flip_aug=True,
                  noise_offset=0.05, cache_latents=False)
    single = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=root / "single", device="cpu")
    reference = train(TrainConfig(**values), single)
    return root, values, reference


def spawn(world_size, tiny_checkpoint_path, out_dir, values, run_dir=None, stop_at=None):
    mp.spawn(run, args=(world_size, free_port(), str(tiny_checkpoint_path), str(out_dir), values, run_dir and str(run_dir), stop_at),
             nprocs=world_size, join=True)


def test_two_processes_follow_one_process_loss_curve_and_weights(setup, tiny_checkpoint_path):
    root, values, reference = setup
    spawn(2, tiny_checkpoint_path, root / "two", values)
    two = root / "two" / "runs" / "ddp"
    assert len(losses(two)) == reference.steps == 6
    assert losses(two) == pytest.approx(losses(reference.run_dir), rel=1e-4, abs=1e-6)
    a, b = load_file(str(reference.final_path)), load_file(str(root / "two" / "lora" / "ddp.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_a_run_stopped_in_two_processes_resumes_in_one(setup, tiny_checkpoint_path):
    root, values, reference = setup
    spawn(2, tiny_checkpoint_path, root / "resumed", values, stop_at=3)
    run_dir = root / "resumed" / "runs" / "ddp"
    assert len(losses(run_dir)) == 3
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=root / "resumed", device="cpu")
    result = train(TrainConfig(**values), host, run_dir=run_dir, resume=True)
    assert result.steps == 6 and not result.interrupted
    assert losses(run_dir) == pytest.approx(losses(reference.run_dir), rel=1e-4, abs=1e-6)


def test_one_process_is_the_default_and_keeps_every_row():
    one = Distributed()
    assert (one.rows(5), one.total(0.5), one.any(False)) == (slice(0, 5), 0.5, False)
    shares = [Distributed(rank, 2).rows(5) for rank in range(2)]
    assert [(s.start, s.stop) for s in shares] == [(0, 2), (2, 5)]
