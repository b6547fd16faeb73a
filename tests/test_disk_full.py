"""A full disk: every save keeps the previous file, leaves no temporary file and says what it needs; free space
is checked before a save and before latents are cached to disk."""

import errno
import os
import random
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from lib_lora.atomic import DiskFullError, format_bytes, write_atomically, write_bytes_atomically
from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.models import tensor_files
from lib_lora.networks.files import save_lora, write_card
from lib_lora.train.config import TrainConfig
from lib_lora.train.presets import Preset, save_preset
from lib_lora.train.run_folder import Progress, RunFolder
from lib_lora.train.trainer import TrainingError, train
from lib_lora.ui.compare import keep_epoch

Usage = namedtuple("Usage", "total used free")


def lora(value: float) -> dict[str, torch.Tensor]:
    return {"lora_unet_a.lora_down.weight": torch.full((4, 64), value), "lora_unet_a.lora_up.weight": torch.full((64, 4), value),
            "lora_unet_a.alpha": torch.tensor(4.0)}


def save_state(folder: Path, value: float) -> Path:
    network = torch.nn.Linear(64, 64)
    torch.nn.init.constant_(network.weight, value)
    optimizer = torch.optim.AdamW(network.parameters())
    RunFolder(folder).save_state(Progress(global_step=int(value)), network, optimizer, random.Random(0), torch.Generator())
    return folder / "state.pt"


SAVES = {  # what is saved -> save(folder, value) returning the file written
    "LoRA file": lambda folder, v: save_lora(folder / "k.safetensors", lora(v), {}, overwrite=True),
    "state.pt": save_state,
    "card": lambda folder, v: write_card(folder / "k.safetensors", activation_text=f"zkz {v}")[0],
    "sample image": lambda folder, v: write_atomically(folder / "s.png", lambda tmp: Image.new("RGB", (32, 32), (int(v), 0, 0)).save(tmp, format="PNG")),
    "config": lambda folder, v: write_bytes_atomically(folder / "config.toml", TrainConfig(network_dim=int(v)).to_toml().encode()),
    "preset": lambda folder, v: save_preset(folder, Preset("mine", {"network_dim": int(v)}), overwrite=True),
}


class Disk:
    """What shutil.disk_usage reports: `free` bytes, which a test lowers as the disk fills."""

    def __init__(self, monkeypatch, free: int):
        self.free = free
        monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - self.free, self.free))


def fill_the_disk(monkeypatch) -> None:
    """The disk fills up while the file is written (another program, a big download): there was room before,
    the flush reports ENOSPC (as ext4's delayed allocation, NFS or a quota do), and no space is left."""
    disk = Disk(monkeypatch, 10**9)

    def fsync(fd):
        disk.free = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("what", SAVES)
def test_a_save_on_a_full_disk_keeps_the_previous_file_and_says_so(what, tmp_path, monkeypatch):
    path = SAVES[what](tmp_path, 3.0)
    before = path.read_bytes()
    fill_the_disk(monkeypatch)
    with pytest.raises(DiskFullError) as error:
        SAVES[what](tmp_path, 5.0)
    assert str(error.value).startswith(f"the disk is full: {path} was not saved; the previous {path.name} is kept unchanged; "
                                       "it needs about ") and str(error.value).endswith(f"in {tmp_path}, where 0 bytes is free; free some space and try again")
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def test_a_first_save_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    fill_the_disk(monkeypatch)
    with pytest.raises(DiskFullError, match=r"k.safetensors was not saved; no k.safetensors was there before; it needs about 1.\d kB"):
        SAVES["LoRA file"](tmp_path, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_hides_the_error_number_is_read_by_the_free_space_left(tmp_path, monkeypatch):
    """torch.save's C++ writer reports a full disk as RuntimeError('unexpected pos ...'), safetensors as text."""
    def torch_writer(tmp: Path):
        tmp.write_bytes(b"x" * 100)
        disk.free = 10
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    def safetensors_writer(tmp: Path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    disk = Disk(monkeypatch, 10**9)
    with pytest.raises(DiskFullError, match="needs about 2.0 kB in .*, where 10 bytes is free"):
        write_atomically(tmp_path / "state.pt", torch_writer, size=2000)
    with pytest.raises(DiskFullError, match="the disk is full: .*k.safetensors was not saved"):
        write_atomically(tmp_path / "k.safetensors", safetensors_writer)
    assert list(tmp_path.iterdir()) == []


def test_other_failures_are_not_called_a_full_disk(tmp_path, monkeypatch):
    Disk(monkeypatch, 10**9)

    def refused(tmp: Path):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    with pytest.raises(PermissionError) as error:
        write_atomically(tmp_path / "k.safetensors", refused, size=2000)
    assert not isinstance(error.value, DiskFullError)


def test_free_space_is_checked_before_a_save(tmp_path, monkeypatch):
    path = SAVES["LoRA file"](tmp_path, 3.0)
    before = path.read_bytes()
    Disk(monkeypatch, 500)
    with pytest.raises(DiskFullError, match=rf"^not enough free disk space in {tmp_path} for k.safetensors \(the previous k.safetensors is kept "
                                            r"unchanged\): it needs about 1.\d kB and 500 bytes is free; free some space or choose another folder$"):
        SAVES["LoRA file"](tmp_path, 5.0)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_free_space_is_checked_before_caching_latents_to_disk(tiny_checkpoint_path, tmp_path, monkeypatch):
    data = make_lora_dataset(tmp_path / "data", n_images=4, repeats=1, size=128)
    config = TrainConfig(train_data_dir=str(data), resolution=(128, 128), network_dim=4, max_train_steps=2, output_name="k",
                         cache_latents=True, cache_latents_to_disk=True, flip_aug=True)
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "out", device="cpu")
    Disk(monkeypatch, 20_000)  # room for the run folder's small files, not for 8 latents (4 images, flipped or not) of 4.2 kB
    latents = tmp_path / "out" / "runs" / "k" / "latents"
    with pytest.raises(TrainingError, match=rf"^not enough free disk space in {latents} for caching latents to disk \(cache_latents_to_disk\): "
                                            r"it needs about 33.8 kB and 20.0 kB is free; free some space or choose another folder\. Training stopped; "
                                            r"once there is room, resume the run folder"):
        train(config, host)
    assert list(latents.iterdir()) == []


def test_a_full_disk_mid_run_stops_with_the_last_state_kept_and_resumes(tiny_checkpoint_path, tmp_path, monkeypatch):
    data = make_lora_dataset(tmp_path / "data", n_images=2, repeats=1)
    config = TrainConfig(train_data_dir=str(data), resolution=(64, 64), network_dim=4, max_train_epochs=2, save_every_n_steps=1, output_name="k")
    real_save_file = tensor_files.save_file

    def full_at_step_3(tensors, path, metadata=None):
        if "step00000003" in path:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(tensor_files, "save_file", full_at_step_3)
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "out", device="cpu")
    with pytest.raises(TrainingError, match=r"the disk is full: .*k-step00000003.safetensors was not saved.*resume the run folder"):
        train(config, host)
    run_dir = tmp_path / "out" / "runs" / "k"
    assert torch.load(run_dir / "state.pt", weights_only=False)["progress"]["global_step"] == 2
    monkeypatch.undo()
    result = train(config, StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "out", device="cpu"), run_dir=run_dir, resume=True)
    assert result.steps == 4 and result.final_path.exists()


def test_sizes_read_as_people_write_them():
    assert [format_bytes(n) for n in (512, 20_000, 2_500_000, 7_100_000_000)] == ["512 bytes", "20.0 kB", "2.5 MB", "7.1 GB"]


def test_keeping_an_epoch_checks_the_room_for_its_copy(tmp_path, monkeypatch):
    chosen = SAVES["LoRA file"](tmp_path, 3.0).rename(tmp_path / "k-000002.safetensors")
    Disk(monkeypatch, 100)
    with pytest.raises(DiskFullError, match=rf"not enough free disk space in {tmp_path} for a copy of k-000002.safetensors as best.safetensors"):
        keep_epoch(chosen, tmp_path / "best.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["k-000002.safetensors"]
