"""Resource guards (issue #19): out of GPU memory mid-run stops with the LoRA and the state saved and says what to
change; the step-math panel warns before a run when the memory estimate exceeds the device's."""

import pytest
import torch

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.networks.files import load_lora
from lib_lora.train.config import TrainConfig
from lib_lora.train.trainer import OUT_OF_MEMORY, TrainingError, out_of_memory_advice, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data"), n_images=4, repeats=1)


def counting_unet(host: StandaloneHost, fail_at: int | None = None) -> list[int]:
    """Counts the host's UNet calls; call number `fail_at` raises CUDA's out-of-memory error, as a full GPU does."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == fail_at:
            raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")

    host.unet.register_forward_pre_hook(hook)
    return calls


def test_out_of_memory_saves_the_lora_and_state_and_resume_redoes_the_unfinished_step(dataset, tiny_checkpoint_path, tmp_path):
    # 4 images, batch 2, 2 micro-batches per step = 1 step per epoch; the 4th UNet call is the 2nd micro-batch of step 2
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=2, gradient_accumulation_steps=2,
                         max_train_epochs=3, network_dim=4, network_alpha=4.0, learning_rate=1e-3, output_name="oom")
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    counting_unet(host, fail_at=4)
    events = []
    with pytest.raises(TrainingError) as error:
        train(config, host, on_event=events.append)
    saved = host.lora_dir / "oom-step00000001.safetensors"
    assert str(error.value).startswith("out of GPU memory at step 2 (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert f"the LoRA so far is saved as {saved} and the run can be resumed from step 1" in str(error.value)
    assert "lower train_batch_size 2 -> 1 (gradient_accumulation_steps 2 -> 4 keeps the effective batch)" in str(error.value)
    assert "turn on gradient_checkpointing" in str(error.value)
    assert load_lora(saved).modules and [e.paths for e in events if e.kind == "save"][-1] == [saved]

    resumed_host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    calls = counting_unet(resumed_host)
    result = train(config, resumed_host, run_dir=tmp_path / "runs" / "oom", resume=True)
    assert result.steps == 3 and len(calls) == 4  # step 2's group runs whole again (both micro-batches), then step 3


def test_out_of_memory_before_any_step_saves_nothing(dataset, tiny_checkpoint_path, tmp_path):
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    counting_unet(host, fail_at=1)
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=1, output_name="first", gradient_checkpointing=True)
    with pytest.raises(TrainingError, match=r"at step 1 .*nothing was trained yet, so nothing was saved\. To fit: a smaller network_dim"):
        train(config, host)
    assert not list(host.lora_dir.glob("first*"))


@pytest.mark.parametrize("changes, advice", [
    (dict(train_batch_size=4, resolution=(1024, 1024)), ["lower train_batch_size 4 -> 2", "lower the resolution 1024x1024 -> 768x768",
                                                          "turn on gradient_checkpointing"]),
    (dict(resolution=(832, 1216), gradient_checkpointing=True), ["lower the resolution 832x1216 -> 576x896"]),
])
def test_the_advice_names_what_to_lower(changes, advice):
    given = out_of_memory_advice(TrainConfig(**changes)).split("; ")
    assert len(given) == len(advice) and all(line.startswith(start) for line, start in zip(given, advice)), given


def test_the_error_caught_is_cudas():
    assert torch.cuda.OutOfMemoryError is OUT_OF_MEMORY
