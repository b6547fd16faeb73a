"""The training loop on a tiny model on CPU: learning, schedules, optimizers, resume, interrupt, NaN."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.models.conditioning import Conditioning
from lib_lora.networks.files import load_lora
from lib_lora.train.config import ConfigError, TrainConfig
from lib_lora.train.optim import lr_multiplier, make_optimizer
from lib_lora.train import trainer
from lib_lora.train.trainer import TrainingError, train


ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process: the malloc settings a CPU run makes last for the process, so one earlier
# test that trained would otherwise decide this test's outcome.
FAULTS_AROUND_A_RUN = """
import resource, sys
from pathlib import Path
import torch
from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.models.conditioning import Conditioning
from lib_lora.train.config import TrainConfig
from lib_lora.train.trainer import train

def faults_per_step():
    \"\"\"Minor page faults of a step that frees and reallocates 64 MiB activations, as a training step does.\"\"\"
    counts = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.randn(64, 64, 64, 64)
        for _ in range(4):
            x = torch.tanh(x * 1.01)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts[1:]  # the first may still grow the heap

out = Path(sys.argv[1])
print(*faults_per_step())
data = make_lora_dataset(out / "data", n_images=1, repeats=1)
host = StandaloneHost.from_file(Path(sys.argv[2]), out_dir=out, device="cpu")
train(TrainConfig(train_data_dir=str(data), resolution=(64, 64), max_train_steps=1, network_dim=4, output_name="t"), host)
print(*faults_per_step())
"""


def test_training_on_a_cpu_reuses_freed_memory_instead_of_faulting_it_back(tiny_checkpoint_path, tmp_path):
    """glibc hands big freed blocks back to the OS, so each step would fault its activations in again
    (a fifth of an SD1.5 step on a CPU). After a CPU run has started, most steps fault no page in."""
    run = subprocess.run([sys.executable, "-c", FAULTS_AROUND_A_RUN, str(tmp_path), str(tiny_checkpoint_path)],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    before, after = ([int(n) for n in line.split()] for line in run.stdout.strip().splitlines()[-2:])
    assert statistics.median(after) * 5 < min(before), f"page faults per step: {before} before training, {after} after"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data"), concept="star", trigger="zkz", n_images=4, repeats=2, seed=0)


@pytest.fixture
def host(tiny_checkpoint_path, tmp_path):
    return StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")


def config_for(dataset, **changes) -> TrainConfig:
    base = dict(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=2, max_train_epochs=1, learning_rate=1e-3,
                network_dim=4, network_alpha=4.0, output_name="t", seed=7)
    return TrainConfig(**(base | changes))


def collect(events):
    return lambda event: events.append(event)


def test_a_run_saves_a_lora_with_metadata_and_card(dataset, host):
    events = []
    result = train(config_for(dataset, trigger_words="zkz"), host, on_event=collect(events))
    assert result.final_path == host.lora_dir / "t.safetensors" and result.steps == 4  # 4 images x 2 repeats / batch 2
    lora = load_lora(result.final_path)
    assert lora.metadata["ss_output_name"] == "t" and lora.metadata["ss_num_train_images"] == "8"
    assert lora.metadata["ss_network_dim"] == "4" and lora.metadata["ss_base_model_version"] == "sd_v1"
    tags = json.loads(lora.metadata["ss_tag_frequency"])
    assert list(tags) == ["2_zkz"] and sum(tags["2_zkz"].values()) == 4  # one caption per image, repeats not counted
    assert (host.lora_dir / "t.json").exists()
    kinds = [e.kind for e in events]
    assert kinds[kinds.count("prepare")] == "start" and kinds.count("step") == 4 and kinds[-1] == "done"  # latents cached first
    start = events[kinds.index("start")]
    assert "4 steps" in start.message or "= 4 optimizer steps" in start.message


def test_a_run_on_torch_2_1_without_torch_amp_grad_scaler_saves(dataset, host, monkeypatch):
    """The webui 1.10.1 ships torch 2.1, whose loss scaler is only `torch.cuda.amp.GradScaler`."""
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    result = train(config_for(dataset, max_train_steps=1), host)
    assert result.steps == 1 and result.final_path.exists()


def test_twenty_steps_on_a_fixed_batch_lower_the_loss(dataset, host):
    """One image, batch 1, 20 steps: the loss at the same image must fall (mean of last 5 < first 5)."""
    config = config_for(dataset, train_batch_size=1, max_train_steps=20, max_train_epochs=20, learning_rate=3e-3, min_timestep=400, max_timestep=401)
    losses = []
    single = dataset.parent / "single"
    make_lora_dataset(single, concept="star", trigger="zkz", n_images=1, repeats=1, seed=3)
    train(config.replace(train_data_dir=str(single)), host, on_event=lambda e: e.kind == "step" and losses.append(e.loss))
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("cache_latents, expected_encodes", [(True, 4), (False, 16)])
def test_cached_latents_encode_each_image_once(dataset, host, monkeypatch, cache_latents, expected_encodes):
    """4 images x 2 repeats x 2 epochs: the VAE runs once per image with the cache, once per sample without."""
    encodes = []
    real = host.encode_pixels
    monkeypatch.setattr(host, "encode_pixels", lambda pixels: encodes.append(len(pixels)) or real(pixels))
    train(config_for(dataset, max_train_epochs=2, cache_latents=cache_latents), host)
    assert sum(encodes) == expected_encodes


def test_existing_lora_is_never_overwritten_silently(dataset, host):
    train(config_for(dataset), host)
    with pytest.raises(ConfigError, match="already exists"):
        train(config_for(dataset), host)


def test_resume_after_interrupt_equals_an_uninterrupted_run(dataset, tiny_checkpoint_path, tmp_path):
    config = config_for(dataset, max_train_epochs=3, save_every_n_epochs=1, network_dropout=0.1)
    straight = train(config, StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "a", device="cpu"))

    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "b", device="cpu")
    stop_at = lambda e: e.kind == "step" and e.step == 5 and host.interrupt()  # mid-epoch 2
    first = train(config, host, on_event=stop_at)
    assert first.interrupted and first.steps == 5 and first.final_path.name == "t-step00000005.safetensors"
    resumed = train(config, StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "b", device="cpu"), run_dir=first.run_dir, resume=True)
    assert not resumed.interrupted and resumed.steps == straight.steps == 12

    a, b = load_file(straight.final_path), load_file(resumed.final_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    rows = (first.run_dir / "loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:] if r.split(",")[2]] == list(range(1, 13))  # no step logged twice


def test_nan_loss_stops_and_keeps_the_last_good_save(dataset, host):
    calls = {"n": 0}
    encode = host.encode_text

    def poisoned(captions, clip_skip):
        calls["n"] += 1
        cond = encode(captions, clip_skip)
        return Conditioning(cond.context * float("nan")) if calls["n"] > 2 else cond

    host.encode_text = poisoned
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*t-step00000002\.safetensors"):
        train(config_for(dataset, save_every_n_steps=2), host)
    assert (host.lora_dir / "t-step00000002.safetensors").exists()
    assert not (host.lora_dir / "t.safetensors").exists()


@pytest.mark.parametrize("optimizer", ["AdamW", "Lion", "Prodigy", "SGD"])
def test_every_optimizer_trains(dataset, host, optimizer):
    lr = 1.0 if optimizer == "Prodigy" else 1e-3
    result = train(config_for(dataset, optimizer_type=optimizer, learning_rate=lr, output_name=optimizer), host)
    weights = load_file(result.final_path)
    ups = [v for k, v in weights.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups), "lora_up starts at zero; a working optimizer moves it"


def test_adamw_takes_the_reference_adamw_step():
    """The fused AdamW we build (one kernel over all LoRA tensors) is the textbook update, decay included."""
    torch.manual_seed(0)
    ours_params = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16, 8))]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    initial = [p.detach().clone() for p in ours_params]
    ours = make_optimizer([{"params": ours_params, "lr": 1e-2}], optimizer_type="AdamW", weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8, momentum=0.0)
    reference = torch.optim.AdamW(reference_params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    assert ours.defaults["fused"], "this torch has a fused CPU AdamW (2.4+): it should be the one used"
    for _ in range(3):
        for p, q in zip(ours_params, reference_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    for p, q, start in zip(ours_params, reference_params, initial):
        assert (p - start).abs().max() > 1e-3  # it moved
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_adamw_falls_back_whole_where_the_device_has_no_fused_kernel(monkeypatch):
    """torch < 2.4 has no fused AdamW on a CPU (the webui 1.10.1 ships 2.1), and its constructor refuses one after
    filling the groups with its defaults: the plain one must take over, with no group left asking for `fused`."""

    class AdamWOfTorch21(torch.optim.AdamW):
        def __init__(self, params, fused=None, **kwargs):
            super().__init__(params, fused=fused, **kwargs)
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")

    monkeypatch.setattr(torch.optim, "AdamW", AdamWOfTorch21)
    param = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer = make_optimizer([{"params": [param], "lr": 1e-3}], optimizer_type="AdamW", weight_decay=0.0, betas=(0.9, 0.99),
                               eps=1e-8, momentum=0.0)
    assert [group["fused"] for group in optimizer.param_groups] == [None]


def test_adamw8bit_without_cuda_is_a_clear_error(dataset, host):
    with pytest.raises(ConfigError, match="AdamW8bit"):
        train(config_for(dataset, optimizer_type="AdamW8bit"), host)


@pytest.mark.parametrize(
    "scheduler,step,expected",
    [
        ("constant", 7, 1.0),
        ("constant_with_warmup", 2, 0.5),  # warmup 4: 2/4
        ("constant_with_warmup", 9, 1.0),
        ("linear", 4, 1.0),
        ("linear", 12, 0.5),  # (20-12)/(20-4)
        ("cosine", 12, 0.5),  # half way through the decay
        ("cosine", 20, 0.0),
        ("cosine_with_restarts", 8, 0.5),  # 2 cycles of 8 steps: a quarter... progress 0.25*2=0.5 -> 0.5
        ("cosine_with_restarts", 12, 1.0),  # restart
        ("polynomial", 12, 0.25),  # power 2: (1 - 0.5)^2
    ],
)
def test_schedulers_follow_their_formulas(scheduler, step, expected):
    value = lr_multiplier(step, scheduler=scheduler, total_steps=20, warmup_steps=4, num_cycles=2, power=2.0)
    assert value == pytest.approx(expected, abs=1e-9)


def test_scheduler_drives_the_optimizer_lr(dataset, host):
    lrs = []
    train(config_for(dataset, max_train_epochs=2, lr_scheduler="linear", lr_warmup_steps=0.25), host, on_event=lambda e: e.kind == "step" and lrs.append(e.lr))
    # 8 steps, warmup int(0.25 * 8) = 2: lr = 1e-3 * [0, 0.5, 1, 5/6, ...]
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[3] == pytest.approx(1e-3 * 5 / 6)


def test_separate_unet_and_text_encoder_learning_rates(dataset, host):
    from lib_lora.train import trainer

    seen = {}
    original = trainer._make_optimizer

    def spy(config, network, host):
        opt = original(config, network, host)
        seen.update({g["name"]: g["lr"] for g in opt.param_groups})
        return opt

    trainer._make_optimizer = spy
    try:
        train(config_for(dataset, unet_lr=2e-4, text_encoder_lr=5e-5), host)
    finally:
        trainer._make_optimizer = original
    assert seen == {"unet": 2e-4, "text_encoder": 5e-5}


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(resolution=(100, 64)), "multiple of 64"),
        (dict(train_batch_size=0), "train_batch_size"),
        (dict(network_train_unet_only=True, network_train_text_encoder_only=True), "choose at most one"),
        (dict(lr_scheduler="exponential"), "lr_scheduler"),
    ],
)
def test_bad_options_are_named(dataset, changes, match):
    with pytest.raises(ConfigError, match=match):
        config_for(dataset, **changes)


def test_bad_dataset_inputs_are_clear_errors(tmp_path, host):
    from lib_lora.data.errors import DatasetError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty"):
        train(config_for(empty), host)
    zero = tmp_path / "zero"
    make_lora_dataset(zero, n_images=2, repeats=1)
    (zero / "1_zkz").rename(zero / "0_zkz")
    with pytest.raises(DatasetError, match="repeats"):
        train(config_for(zero), host)
    few = make_lora_dataset(tmp_path / "few", n_images=2, repeats=1)
    with pytest.raises(DatasetError, match="batch"):
        train(config_for(few, train_batch_size=64), host)


def test_masked_loss_and_noise_options_run(dataset, host):
    config = config_for(dataset, masked_loss=True, noise_offset=0.1, multires_noise_iterations=3, min_snr_gamma=5.0, flip_aug=True, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128)
    result = train(config, host)
    assert math.isfinite(result.last_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_unet_traces_the_adapters_in_one_graph_and_trains_alike(dataset, tiny_checkpoint_path, tmp_path, dtype):
    """torch_compile: the hooked UNet and the trained text encoder are one graph each (a break per adapter would make
    every layer a compile of its own and the step slower than eager), the run's losses and LoRA equal eager's, and
    the modules run uncompiled again afterwards; on a bf16 model too, whose adapters read their half copies. aot_eager
    traces as inductor does, without its minutes of C++ code generation."""
    from torch._dynamo.utils import counters

    config = config_for(dataset, trigger_words="zkz")
    runs = {}
    for compiled in (False, True):
        losses, host = [], StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / str(compiled), device="cpu", dtype=dtype)
        torch._dynamo.reset()
        counters.clear()
        result = train(config.replace(torch_compile=compiled, dynamo_backend="aot_eager"), host,
                       on_event=lambda e: e.kind == "step" and losses.append(e.loss))
        runs[compiled] = losses, load_file(result.final_path), dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    (eager_losses, eager_lora, _, eager_graphs), (losses, lora, breaks, graphs) = runs[False], runs[True]
    assert eager_graphs == 0 and graphs == 2 and not breaks, (graphs, breaks)
    assert "forward" not in vars(host.unet) and all("forward" not in vars(m.module) for m in host.text_encoders)
    assert losses == pytest.approx(eager_losses, abs=1e-5) and len(losses) == 4
    assert lora.keys() == eager_lora.keys()
    assert all(torch.allclose(lora[k].float(), eager_lora[k].float(), atol=1e-5) for k in lora)


def test_epoch_saves_keep_only_the_last_k(dataset, host):
    train(config_for(dataset, max_train_epochs=4, save_every_n_epochs=1, save_last_n_epochs=2), host)
    names = sorted(p.name for p in host.lora_dir.glob("*.safetensors"))
    assert names == ["t-000002.safetensors", "t-000003.safetensors", "t.safetensors"]


def test_training_leaves_the_host_rng_and_weights_untouched(dataset, host):
    before = {k: v.clone() for k, v in host.unet.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(config_for(dataset), host)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in host.unet.state_dict().items())


def test_the_base_model_hashes_follow_the_file_when_it_changes(tmp_path):
    # hashed on a background thread while the CLI loads the checkpoint; a rewritten file is hashed again
    import hashlib
    import os

    from lib_lora.train.saving import checkpoint_hashes, hash_in_background

    path = tmp_path / "base.safetensors"
    path.write_bytes(b"a" * (0x110000 + 5))
    hash_in_background(path)
    assert checkpoint_hashes(path, path.stat().st_mtime_ns)["new_sd_model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"b" * (0x110000 + 5))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    hashes = checkpoint_hashes(path, path.stat().st_mtime_ns)
    assert hashes["new_sd_model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashes["sd_model_hash"] == hashlib.sha256(b"b" * 0x10000).hexdigest()[:8]


def test_class_images_are_drawn_by_the_base_without_the_trigger_and_trained_on(dataset, host):
    from lib_lora.models.pipeline import GenerationParams
    from PIL import Image

    from lib_lora.train.dataset import plan_training

    events = []
    config = config_for(dataset, trigger_words="zkz", num_class_images=3, class_images_cfg_scale=3.0)
    planned = plan_training(config).steps.total_steps  # the step math the tab shows, before any is drawn
    result = train(config, host, on_event=collect(events))
    folder = result.run_dir / "class_images" / "1_class"
    images = sorted(folder.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text() for p in images]
    assert len(images) == 3 and all(c and "zkz" not in c for c in captions)
    # drawn by the base before any LoRA: the same picture the plain model gives for that prompt, seed and CFG scale
    base = host.generate(GenerationParams(prompt=captions[1], steps=20, cfg_scale=3.0, seed=config.seed + 1, width=64, height=64))[0]
    assert Image.open(images[1]).tobytes() == base.tobytes()
    assert Image.open(images[1]).tobytes() != host.generate(GenerationParams(prompt=captions[1], steps=20, cfg_scale=7.0,
                                                                             seed=config.seed + 1, width=64, height=64))[0].tobytes()
    # as with a regularization folder (kohya): 4 images x 2 repeats + as many class samples (the 3 in turn), batch 2
    assert result.steps == planned == (8 + 8) // 2
    prepare = [e for e in events if e.kind == "prepare" and e.message.startswith("class images")]
    assert [e.step for e in prepare] == [1, 2, 3] and events.index(prepare[-1]) < next(i for i, e in enumerate(events) if e.kind == "start")


def test_regularization_images_trained_toward_the_base_cost_nothing_until_the_lora_changes_their_prompts(dataset, host, tmp_path):
    """prior_loss_target=base: a regularization row's target is the base model's own prediction (every adapter off),
    so at the first step, where a fresh LoRA adds exactly 0, those rows add no loss: the step's loss is that of the
    training rows alone (prior_loss_weight 0), where the noise target adds the base's own error on them. Later steps
    train them, and the adapters are back on for every prediction but that target."""
    from lib_lora.demo.main_job import make_reg_dataset

    reg = make_reg_dataset(tmp_path / "reg", n_images=4)

    def step_losses(name: str, **changes) -> list[float]:
        losses = []
        train(config_for(dataset, reg_data_dir=str(reg), max_train_steps=3, output_name=name, **changes), host,
              on_event=lambda e: e.kind == "step" and losses.append(e.loss))
        return losses

    toward_base = step_losses("toward-base", prior_loss_target="base")
    training_rows_only = step_losses("training-rows-only", prior_loss_weight=0.0)
    toward_noise = step_losses("toward-noise")
    assert toward_base[0] == pytest.approx(training_rows_only[0], rel=1e-6)
    assert toward_noise[0] > toward_base[0] * 1.01
    assert toward_base[1:] != pytest.approx(training_rows_only[1:], rel=1e-6)  # the LoRA moved: its reg rows now cost


def test_a_run_that_uses_every_image_caches_their_latents_first_and_frees_the_vae_encoder(dataset, tiny_checkpoint_path, tmp_path,
                                                                                          monkeypatch):
    """kohya's cache_latents: every latent (each side, with flip_aug) encoded before the first step, after which the
    standalone host frees its VAE encoder (SD1.5: 130 MiB of the CPU run's peak), giving the LoRA that encoding as
    it goes gives."""
    host, events = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "first", device="cpu"), []
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = host.encode_pixels(pixels)
    config = config_for(dataset, flip_aug=True, max_train_epochs=2)  # 16 samples drawn, 8 latents to cache
    first = train(config, host, on_event=events.append)
    caching = [e for e in events if e.kind == "prepare"]
    assert [e.step for e in caching] == list(range(1, 9)) and all(e.message.startswith("caching latents") for e in caching)
    assert events.index(caching[-1]) < next(i for i, e in enumerate(events) if e.kind == "start")
    assert host.ckpt.vae.encoder is None
    assert torch.equal(host.encode_pixels(pixels), latents)  # read from the file again when asked
    # Interrupt while caching: the run stops at its first step, with its LoRA saved and resumable
    stopped = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "stopped", device="cpu")
    result = train(config, stopped, on_event=lambda e: e.kind == "prepare" and e.step == 2 and stopped.interrupt())
    assert result.interrupted and result.steps == 1 and result.final_path.exists()
    monkeypatch.setattr(trainer, "_cache_latents_first", lambda *args: None)
    second = train(config, StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "second", device="cpu"))
    first_weights, second_weights = load_file(first.final_path), load_file(second.final_path)
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    # a run shorter than its cache encodes as it goes; held-out validation images keep the encoder in use
    short, events = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "short", device="cpu"), []
    train(config_for(dataset, max_train_steps=1), short, on_event=events.append)
    assert not [e for e in events if e.kind == "prepare"] and short.ckpt.vae.encoder is not None
    validated = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "validated", device="cpu")
    train(config_for(dataset, validation_split=0.25, max_train_epochs=2), validated)
    assert validated.ckpt.vae.encoder is not None


def test_class_images_are_kept_when_a_run_resumes(dataset, tiny_checkpoint_path, tmp_path):
    config = config_for(dataset, trigger_words="zkz", num_class_images=2, max_train_epochs=2)
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    first = train(config, host, on_event=lambda e: e.kind == "step" and e.step == 2 and host.interrupt())
    drawn = {p: p.stat().st_mtime_ns for p in (first.run_dir / "class_images" / "1_class").glob("*.png")}
    events = []
    resumed = train(config, StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu"), run_dir=first.run_dir,
                    resume=True, on_event=collect(events))
    assert first.interrupted and not resumed.interrupted and len(drawn) == 2
    assert {p: p.stat().st_mtime_ns for p in drawn} == drawn


def test_class_images_need_the_trigger_words_to_leave_out(dataset, host):
    """The embedded model's default preset asks for class images: a run without trigger words trains without them, warned."""
    events = []
    result = train(config_for(dataset, num_class_images=10), host, on_event=collect(events))
    assert any(e.kind == "warning" and e.message.startswith("num_class_images: no class images are drawn") for e in events)
    assert result.steps == 4 and not (result.run_dir / "class_images").exists()  # 4 images x 2 repeats, batch 2


def test_the_cli_loads_the_vae_decoder_only_for_runs_that_draw(dataset, tiny_checkpoint_path, tmp_path, monkeypatch):
    from lib_lora.__main__ import main

    loaded = []
    original = StandaloneHost.from_file.__func__
    monkeypatch.setattr(StandaloneHost, "from_file", classmethod(lambda cls, *a, **k: loaded.append(k["draws_images"]) or original(cls, *a, **k)))
    common = ["train", "--checkpoint", str(tiny_checkpoint_path), "--train_data_dir", str(dataset), "--resolution", "64",
              "--network_dim", "4", "--max_train_steps", "1"]
    assert main([*common, "--out-dir", str(tmp_path / "a"), "--output_name", "plain"]) in (0, None)
    assert main([*common, "--out-dir", str(tmp_path / "b"), "--output_name", "drawn", "--sample_prompts", "a zkz star --s 2",
                 "--sample_every_n_steps", "1"]) in (0, None)
    assert loaded == [False, True]
    assert (tmp_path / "a" / "lora" / "plain.safetensors").exists() and list((tmp_path / "b" / "runs" / "drawn" / "samples").glob("*.png"))


ONE_OFF_BLOCKS = """
import os, torch
from lib_lora.train.cpu_memory import keep_freed_memory, one_off_allocations
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def freed_at_once():
    block = torch.ones(2**24)  # 64 MiB
    before = resident_mib()
    del block
    return before - resident_mib()
keep_freed_memory()
with one_off_allocations():
    inside = freed_at_once()
print(inside, freed_at_once())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_vae_encode_while_training_gives_its_big_blocks_back_and_the_steps_keep_theirs():
    """Inside one_off_allocations (each latent's encode) a freed 64 MiB block leaves the process at once instead of
    staying in the heap the steps reuse; after it, training's keep-freed-memory setting is back."""
    done = subprocess.run([sys.executable, "-c", ONE_OFF_BLOCKS], capture_output=True, text=True, check=True, cwd=ROOT)
    inside, after = map(float, done.stdout.split())
    assert inside > 60 and after < 4


def test_the_cli_names_a_dataset_mistake_before_loading_the_checkpoint(tmp_path, monkeypatch, capsys):
    from lib_lora.__main__ import main

    (tmp_path / "flat").mkdir()
    make_lora_dataset(tmp_path / "made", n_images=1, repeats=1)
    for image in (tmp_path / "made").glob("*/*"):
        image.rename(tmp_path / "flat" / image.name)  # images directly in the folder: kohya needs N_name subfolders
    monkeypatch.setattr(StandaloneHost, "from_file", classmethod(lambda cls, *a, **k: pytest.fail("the checkpoint was loaded")))
    assert main(["train", "--train_data_dir", str(tmp_path / "flat"), "--out-dir", str(tmp_path / "out")]) == 2
    assert "holds images directly" in capsys.readouterr().err


def test_a_failed_hash_is_tried_again(tmp_path, monkeypatch):
    # a read error while hashing in the background must not stick to the file for the rest of the process
    import hashlib

    from lib_lora.train import saving

    path = tmp_path / "base.safetensors"
    path.write_bytes(b"c" * (0x110000 + 5))
    monkeypatch.setattr(saving, "file_sha256", lambda p: (_ for _ in ()).throw(OSError("read error")))
    with pytest.raises(OSError, match="read error"):
        saving.checkpoint_hashes(path, path.stat().st_mtime_ns)
    monkeypatch.undo()
    assert saving.checkpoint_hashes(path, path.stat().st_mtime_ns)["new_sd_model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_bf16_model_trains_from_half_copies_exactly_as_from_casts(dataset, tiny_checkpoint_path, tmp_path, monkeypatch):
    """On a half-precision model the adapters compute from half copies of their fp32 weights, refreshed once a step,
    instead of a cast of each factor in every forward and backward: the same losses and the same saved LoRA, bit for
    bit, with the text encoder, gradient accumulation and a sample between steps, and two casts fewer per factor
    and micro-batch (4 steps of 2)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    config = config_for(dataset, trigger_words="zkz", gradient_accumulation_steps=2, max_train_epochs=2,
                        sample_every_n_steps=1, sample_prompts=("zkz --s 2",))
    runs = {}
    for copies in (False, True):
        if not copies:
            monkeypatch.setattr(trainer, "compute_dtype", lambda *_: None)
        else:
            monkeypatch.undo()
        host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / str(copies), device="cpu", dtype=torch.bfloat16)
        losses, casts = [], CountCasts()
        with casts:
            result = train(config, host, on_event=lambda e: e.kind == "step" and losses.append(e.loss))
        runs[copies] = losses, load_file(result.final_path), casts.count
    (cast_losses, cast_lora, casts_before), (losses, lora, casts_after) = runs[False], runs[True]
    assert len(losses) == 4 and losses == cast_losses
    assert lora.keys() == cast_lora.keys() and all(torch.equal(lora[k], cast_lora[k]) for k in lora)
    factors = sum(key.endswith((".lora_down.weight", ".lora_up.weight")) for key in lora)
    assert casts_before - casts_after >= 2 * factors * 8, (casts_before, casts_after, factors)


def test_half_copies_give_fp32_gradients_and_let_go_of_the_factors_after_the_run():
    """The copies' gradients land in the fp32 weights' gradients; after the run (the webui may keep the network for
    its previews) the factors compute from their fp32 weights and hold no copy, nor a transpose of one."""
    from lib_lora.networks.lora import LoRAModule
    from lib_lora.train.half_copies import HalfCopies

    layer = torch.nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=2, alpha=2.0)
    torch.nn.init.normal_(module.lora_up.weight)
    copies = HalfCopies.for_network(module, torch.bfloat16)
    module.apply_to()
    layer(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    copies.gather_grads()
    grads = [module.lora_down.weight.grad, module.lora_up.weight.grad]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    assert module.lora_down.half_copy.grad is None  # moved, so the next backward does not add to it
    copies.close()
    assert all(f.half_copy is None and f._transposed is None for f in (module.lora_down, module.lora_up))


@pytest.mark.parametrize("network_type", ["loha", "lokr"])
def test_lycoris_networks_train_on_a_bf16_model(dataset, tiny_checkpoint_path, tmp_path, network_type):
    """LoHa and LoKr build their delta from the fp32 weights, so they get no half copies, and train as before."""
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu", dtype=torch.bfloat16)
    result = train(config_for(dataset, network_type=network_type, max_train_steps=2), host)
    assert result.steps == 2 and math.isfinite(result.last_loss) and result.final_path.exists()


def test_the_adapters_compute_in_autocasts_dtype_where_it_is_on():
    """Under autocast the layers' outputs, which the adapters follow, are in autocast's dtype, whatever the model's."""
    from lib_lora.train.half_copies import compute_dtype

    assert compute_dtype(torch.float16, torch.bfloat16) == torch.bfloat16
    assert compute_dtype(torch.float32, torch.float16) == torch.float16
    assert compute_dtype(torch.bfloat16, None) == torch.bfloat16
    assert compute_dtype(torch.float32, None) is None
