"""Resource guards (issue #19): out of GPU memory mid-run stops with the LoRA and the state saved and says what to
change; the step-math panel warns before a run when the memory estimate exceeds the device's."""

import pytest
import torch

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.networks.files import load_lora
from lib_lora.train.config import TrainConfig
from lib_lora.networks.network import make_network
from lib_lora.train.memory import ModelMemory, estimate_step_memory, memory_warning, out_of_memory_advice
from lib_lora.train.trainer import OUT_OF_MEMORY, TrainingError, train
from lib_lora.ui.controller import TabController
from lib_lora.ui.fields import config_widget_values


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


# ---------------------------------------------------------------- the estimate before a run


@pytest.mark.parametrize("network_type, conv_dim, text", [("lora", 0, False), ("lora", 0, True), ("locon", 2, False)])
def test_the_lora_size_counted_per_rank_is_the_size_of_the_network_built(tiny_checkpoint_path, tmp_path, network_type, conv_dim, text):
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    memory = ModelMemory.counted(host, 8 * 2**30)
    network = make_network(host.unet, host.text_encoders if text else None, network_dim=4, network_alpha=4,
                           conv_dim=conv_dim or None, conv_alpha=conv_dim or None)
    resblocks = 4 * memory.resblock_per_rank + conv_dim * memory.conv_per_rank if conv_dim else 0
    counted = 4 * memory.unet_per_rank + resblocks + (4 * memory.text_per_rank if text else 0)
    assert counted == sum(p.numel() for p in network.parameters())
    assert memory.weight_bytes == sum(p.numel() * 4 for m in (host.unet, *[t.module for t in host.text_encoders]) for p in m.parameters())


SD15 = ModelMemory(device_bytes=8 * 2**30, weight_bytes=859_520_964 * 2 + 123_060_480 * 2, unet_per_rank=6_782_976 // 16, resblock_per_rank=0, conv_per_rank=0,
                   text_per_rank=0, half_weights=True)  # SD1.5 in fp16 on an 8 GiB card (bench/memory_estimate.py's counts)


def test_the_estimate_matches_the_benchs_count_for_sd15():
    estimate = estimate_step_memory("sd1", SD15, batch=1, resolution=(512, 512), network_dim=16, conv_dim=0, train_text_encoder=False,
                                    optimizer="AdamW", gradient_checkpointing=False, autocast=True)
    # bench: activations 986.3 MiB, LoRA params + grads + AdamW 25.9 + 25.9 + 51.8 MiB
    assert estimate.activations / 2**20 == pytest.approx(986.3, rel=0.01) and estimate.adapter / 2**20 == pytest.approx(103.6, rel=0.01)
    double = estimate_step_memory("sd1", SD15, batch=2, resolution=(1024, 512), network_dim=16, conv_dim=0, train_text_encoder=False,
                                  optimizer="AdamW", gradient_checkpointing=False, autocast=True)
    assert double.activations == pytest.approx(4 * estimate.activations, rel=1e-6)


def test_the_step_math_warns_when_the_step_will_not_fit_the_gpu(dataset, tiny_checkpoint_path, tmp_path, monkeypatch):
    config = TrainConfig(train_data_dir=str(dataset), resolution=(1024, 1024), train_batch_size=4)
    warning = memory_warning(config, "sd1", SD15)
    assert warning.startswith("estimated GPU memory for a training step 17.8 GiB") and "is more than this GPU's 8.0 GiB" in warning
    assert "activations at batch 4 of 1024x1024 15.4" in warning and warning.endswith(out_of_memory_advice(config))
    assert memory_warning(config.replace(resolution=(512, 512), train_batch_size=1), "sd1", SD15) is None

    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    monkeypatch.setattr(ModelMemory, "of", classmethod(lambda cls, h: cls.counted(h, 2**30)))  # as on a 1 GiB GPU
    values = config_widget_values(config.replace(resolution=(64, 64), train_batch_size=2))
    assert not any("GPU memory" in w for w in TabController(host).summary(values).warnings)
    big = TabController(host).summary({**values, "resolution": "512", "train_batch_size": 4}).warnings
    assert any(w.startswith("estimated GPU memory for a training step") and "lower train_batch_size 4 -> 2" in w for w in big), big
