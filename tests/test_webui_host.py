"""The webui host on a stand-in webui (tests/fake_webui) around our tiny models.

Checks what webui-integration.md asks of an in-webui trainer: the lock is held for the whole run,
hijacks are undone and redone in order, merged LoRAs are unmerged, nothing is left changed,
refusals are clear `WebuiHostError`s, Interrupt stops and saves, and a finished LoRA lands in the
Lora folder and is registered.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fake_webui
from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts import webui as webui_host
from lib_lora.hosts.webui import WebuiHostError, open_webui_host, versioned_output_name
from lib_lora.networks.files import load_lora
from lib_lora.networks.network import make_network
from lib_lora.train.config import TrainConfig
from lib_lora.train.trainer import train


@pytest.fixture
def webui(tmp_path, monkeypatch):
    env = fake_webui.install(tmp_path, monkeypatch)
    yield env
    fake_webui.uninstall()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data"), concept="star", trigger="zkz", n_images=2, repeats=1, seed=0)


def config_for(dataset, **changes) -> TrainConfig:
    base = dict(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=1, max_train_epochs=1, learning_rate=1e-3,
                network_dim=2, network_alpha=2.0, output_name="w", seed=3)
    return TrainConfig(**(base | changes))


def a_linear(sd_model):
    return next(m for name, m in sd_model.model.diffusion_model.named_modules() if name.endswith("attn1.to_q"))


# ---- preparing and restoring --------------------------------------------------------------------


def test_session_locks_undoes_hijacks_and_restores_in_order(webui):
    with open_webui_host() as host:
        inside = list(webui.calls)
        assert webui.modules.call_queue.queue_lock.locked()
        assert webui.shared.state.job == "train-lora"
    assert inside == ["lock.acquire", "state.begin(train-lora)", "undo_optimizations"]
    assert webui.calls[len(inside):] == ["apply_optimizations", "torch_gc", "state.end", "lock.release"]
    assert not webui.modules.call_queue.queue_lock.locked()
    assert host.lora_dir == webui.root / "models" / "Lora" and host.runs_dir == webui.root / "outputs" / "train-lora"


def test_optimizations_stay_when_the_webui_setting_keeps_them_for_training(webui):
    webui.shared.opts.data["training_xattention_optimizations"] = True
    with open_webui_host():
        pass
    assert "undo_optimizations" not in webui.calls and "apply_optimizations" not in webui.calls


def test_caller_holding_the_lock_gets_no_second_acquire(webui):
    with webui.modules.call_queue.queue_lock:  # as inside wrap_gradio_gpu_call: FIFOLock is not reentrant
        with open_webui_host(hold_lock=False):
            pass
    assert webui.calls.count("lock.acquire") == 1 and "state.begin(train-lora)" not in webui.calls


def test_task_id_is_queued_for_the_progress_bar(webui):
    with open_webui_host(id_task="task(abc)"):
        assert webui.modules.progress.current_task == "task(abc)"
    assert webui.calls[0] == "progress.queue(task(abc))" and webui.modules.progress.current_task is None


def test_merged_loras_are_unmerged_and_forgotten(webui):
    layer = a_linear(webui.shared.sd_model)
    original = layer.weight.detach().clone()
    webui.networks.merge(layer, torch.ones_like(layer.weight))
    webui.networks.loaded_networks.append("old")
    with open_webui_host():
        assert torch.equal(layer.weight, original)
        assert webui.networks.loaded_networks == [] and layer.network_current_names == ()


def test_hypernetworks_requires_grad_and_ldm_checkpoint_flags_come_back(webui):
    sd_model = webui.shared.sd_model
    webui.shared.loaded_hypernetworks.append("hn")
    block = next(m for m in sd_model.model.diffusion_model.modules() if type(m).__name__ == "BasicTransformerBlock")
    block.checkpoint = True  # ldm's reentrant CheckpointFunction would drop the adapters' grads
    before = [p.requires_grad for p in sd_model.parameters()]
    with open_webui_host():
        assert webui.shared.loaded_hypernetworks == []
        assert not any(p.requires_grad for p in sd_model.parameters()) and block.checkpoint is False
    assert webui.shared.loaded_hypernetworks == ["hn"] and block.checkpoint is True
    assert [p.requires_grad for p in sd_model.parameters()] == before and any(before)


# ---- refusals ----------------------------------------------------------------------------------


def forge(webui):
    webui.shared.sd_model.forge_objects = object()


def sdxl_refiner(webui):
    webui.shared.sd_model.is_sdxl = True  # an sgm model without CLIP-L + bigG text embedders


def sd3(webui):
    webui.shared.sd_model.is_sd3 = True


def sdxl_inpainting(webui):
    webui.shared.sd_model.is_sdxl_inpaint = True


def lowvram(webui):
    webui.shared.cmd_opts.lowvram = True


def medvram_with_text_encoder(webui):
    webui.shared.sd_model.lowvram = True


def no_model(webui):
    webui.shared.sd_model = None


def tensorrt(webui):
    webui.modules.sd_unet.current_unet = object()


def inpainting(webui):
    webui.shared.sd_model.model.conditioning_key = "hybrid"


@pytest.mark.parametrize(("setup", "words"), [
    (forge, "Forge host"), (sdxl_refiner, "SDXL refiner"), (sd3, "SD3"), (sdxl_inpainting, "inpainting"), (lowvram, "--lowvram"), (medvram_with_text_encoder, "only the UNet"),
    (no_model, "No Stable Diffusion checkpoint"), (tensorrt, "SD Unet"), (inpainting, "inpainting"),
])
def test_unsupported_setups_are_refused_clearly_and_release_the_lock(webui, setup, words):
    setup(webui)
    with pytest.raises(WebuiHostError, match=words):
        with open_webui_host(TrainConfig()):  # trains the text encoder too
            pytest.fail("the session must not start")
    assert webui.calls[-2:] == ["state.end", "lock.release"] and not webui.modules.call_queue.queue_lock.locked()


def test_medvram_trains_the_unet_only_and_moves_it_in_through_the_webui_hook(webui, dataset):
    sd_model = webui.shared.sd_model
    sd_model.lowvram = True
    moved = []
    sd_model.model.register_forward_pre_hook(lambda module, args: moved.append(module))  # lowvram's send_me_to_gpu
    with open_webui_host(config_for(dataset, network_train_unet_only=True)) as host:
        host.unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 128))
    assert moved == [sd_model.model]
    assert not sd_model.model.diffusion_model._forward_pre_hooks


# ---- the Host interface ------------------------------------------------------------------------


def test_schedule_is_the_fp32_original_and_weights_are_the_webuis(webui):
    sd_model = webui.shared.sd_model
    with open_webui_host() as host:
        assert host.schedule.alphas_cumprod.dtype == torch.float32
        assert torch.equal(host.schedule.alphas_cumprod, sd_model.alphas_cumprod_original)
        assert host.schedule.parameterization == "eps" and host.model_name == "tiny" and host.sd_version == "sd_v1"
        assert host.unet is sd_model.model.diffusion_model and host.text_encoders[0].module is sd_model.cond_stage_model.wrapped.transformer


def test_latents_are_the_scaled_posterior_mean(webui):
    sd_model = webui.shared.sd_model
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with open_webui_host() as host:
        latents = host.encode_pixels(pixels)
    mean, _ = sd_model.first_stage_model.encode_moments(pixels)
    assert torch.allclose(latents, mean * sd_model.scale_factor)


def test_text_goes_through_the_webui_conditioning_with_clip_skip_and_gradients(webui):
    opts = webui.shared.opts
    with open_webui_host() as host:
        network = make_network(None, host.text_encoders, network_dim=2, network_alpha=2.0)
        for module in network.adapters():
            torch.nn.init.normal_(module.lora_up.weight)
        with network:
            z = host.encode_text(["a zkz star"], clip_skip=2).context
            assert opts.data["CLIP_stop_at_last_layers"] == 1  # restored after the call
            z.square().mean().backward()
            opts.data["CLIP_stop_at_last_layers"] = 2
            expected = host.sd_model.cond_stage_model(["a zkz star"])
    grads = {m.lora_name: m.lora_up.weight.grad for m in network.adapters()}
    assert all(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "_layers_2_" not in name)
    assert all(g is None for name, g in grads.items() if "_layers_2_" in name)  # clip skip 2: the last of 3 layers is unused
    assert torch.allclose(z.detach(), expected)


def test_interrupt_comes_from_the_webui_state(webui):
    with open_webui_host() as host:
        assert not host.interrupted()
        webui.shared.state.interrupt()
        assert host.interrupted()
        host.clear_interrupt()
        assert not host.interrupted() and not webui.shared.state.interrupted


def test_gradient_checkpointing_wraps_blocks_non_reentrant_and_unwraps(webui):
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 128)
    with open_webui_host() as host:
        network = make_network(host.unet, None, network_dim=2, network_alpha=2.0)
        for module in network.adapters():
            torch.nn.init.normal_(module.lora_up.weight, std=0.1)
        grads = []
        for enabled in (False, True):
            host.set_gradient_checkpointing(enabled)
            network.zero_grad()
            with network:
                host.unet(x, t, context).square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in network.unet_parameters()]))
        wrapped = [m for m in host.unet.modules() if "forward" in vars(m)]
        assert wrapped and {type(m).__name__ for m in wrapped} == {"ResBlock", "BasicTransformerBlock"}
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert not [m for m in host.unet.modules() if "forward" in vars(m)]


# ---- training --------------------------------------------------------------------------------


def test_a_short_run_holds_the_lock_renders_samples_with_the_adapters_and_registers_the_file(webui, dataset):
    config = config_for(dataset, sample_every_n_steps=2, sample_prompts=("zkz star --s 2 --w 64 --h 64",), clip_skip=2, gradient_checkpointing=True)
    lock, state, processing = webui.modules.call_queue.queue_lock, webui.shared.state, webui.modules.processing
    seen = []

    def on_event(event):
        seen.append((event.kind, lock.locked(), state.job_count, state.job_no))

    with open_webui_host(config) as host:
        result = train(config, host, on_event=on_event)
    path = webui.root / "models" / "Lora" / "w.safetensors"
    assert result.final_path == path and result.steps == 2 and not result.interrupted
    assert all(locked for _, locked, _, _ in seen)
    assert [(c, n) for kind, _, c, n in seen if kind == "step"] == [(2, 1), (2, 2)]
    assert processing.records == [{"prompt": "zkz star", "clip_skip": 2, "hooks_live": True, "sampler": "Euler a"}]
    assert (state.job_count, state.job_no) == (0, 2)  # state.end() after the run; job_no as training left it
    assert state.current_image is not None  # the sample became the live preview
    assert "w" in webui.networks.available_networks and "list_available_networks" in webui.calls
    lora = load_lora(path)
    assert lora.metadata["ss_sd_model_name"] == "tiny" and lora.metadata["ss_clip_skip"] == "2"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in lora.modules) and any(k.startswith("lora_unet_") for k in lora.modules)
    assert not any(m._forward_hooks or "forward" in vars(m) for m in webui.shared.sd_model.modules())


def test_interrupt_from_the_webui_stops_the_run_and_saves(webui, dataset):
    config = config_for(dataset, max_train_epochs=3)
    with open_webui_host(config) as host:
        result = train(config, host, on_event=lambda e: e.kind == "step" and webui.shared.state.interrupt())
    assert result.interrupted and result.steps == 1
    assert result.final_path.name == "w-step00000001.safetensors" and result.final_path.exists()


def test_an_interrupted_run_resumes_to_its_end_under_the_webuis_torch_load(webui, dataset):
    """The webui's torch.load (modules/safe.py) refuses what torch 2.x writes and returns None:
    resuming in the webui failed with "TypeError: 'NoneType' object is not subscriptable"."""
    config = config_for(dataset, max_train_epochs=2, output_name="again")
    with open_webui_host(config) as host:
        first = train(config, host, on_event=lambda e: e.kind == "step" and webui.shared.state.interrupt())
    with open_webui_host(config) as host:
        result = train(config, host, run_dir=first.run_dir, resume=True)
    assert first.interrupted and first.steps == 1
    assert not result.interrupted and result.steps == 4 and result.final_path.name == "again.safetensors"


def test_the_tabs_job_lock_is_the_session_and_its_host_the_prepared_one(webui, dataset):
    """As lib_lora.ui's controller: `with settings.job_lock(): host = host_factory(); train(...)`."""
    binding = webui_host.WebuiTab()
    idle = binding.host()
    assert idle.lora_dir == webui.root / "models" / "Lora" and not webui.modules.call_queue.queue_lock.locked()
    with binding.session():
        host = binding.host()
        assert host is webui_host._active and webui.modules.call_queue.queue_lock.locked()
        result = train(config_for(dataset, output_name="tab"), host)
    assert result.final_path.exists() and webui_host._active is None


def test_medvram_refuses_text_encoder_training_at_the_first_step_when_the_session_had_no_config(webui, dataset):
    webui.shared.sd_model.lowvram = True
    binding = webui_host.WebuiTab()
    with binding.session():
        with pytest.raises(WebuiHostError, match="only the UNet"):
            train(config_for(dataset, output_name="te"), binding.host())
        result = train(config_for(dataset, output_name="unet", network_train_unet_only=True), binding.host())
    assert result.final_path.exists()


def resident_mib() -> float:
    pages = int(open("/proc/self/statm").read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


GLIBC_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (lib_lora/train/cpu_memory.py)")


@GLIBC_ONLY
def test_the_webui_gets_back_the_memory_a_cpu_run_kept(webui, dataset):
    """The trainer keeps freed blocks in the process for its steps; the webui goes on after the session,
    so the blocks freed during the run go back to the system then."""
    held, freed_at = [], []

    def hold_then_free(event):  # 200 MiB of 1 MiB blocks, as a run's activations, freed at its last step
        if event.kind == "step" and event.step == 1:
            held.extend(torch.ones(2**18) for _ in range(200))
        if event.kind == "step" and event.step == 2:
            held.clear()
            freed_at.append(resident_mib())

    config = config_for(dataset)
    with open_webui_host(config) as host:
        train(config, host, on_event=hold_then_free)
    assert freed_at[0] - resident_mib() > 150


BIG_BLOCK_AFTER_GIVE_BACK = """
import os, torch
from lib_lora.train.cpu_memory import give_back_freed_memory, keep_freed_memory
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
keep_freed_memory()
held = [torch.ones(2**18) for _ in range(200)]
del held
give_back_freed_memory()
block = torch.ones(2**26)
before = resident_mib()
del block
print(before - resident_mib())
"""


@GLIBC_ONLY
def test_after_the_give_back_big_blocks_go_back_at_once():
    """glibc's mmap threshold is low again after the session: a 256 MiB block freed later is its own mapping and
    leaves at once. In a fresh process: in the test process, earlier tests' free heap blocks could serve it."""
    done = subprocess.run([sys.executable, "-c", BIG_BLOCK_AFTER_GIVE_BACK], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert float(done.stdout) > 250


def test_captioners_are_the_webuis_interrogators(webui, monkeypatch):
    from PIL import Image

    webui.shared.interrogator = type("Interrogator", (), {"interrogate": lambda self, image: f"blip {image.mode}"})()
    deepbooru = type(sys)("modules.deepbooru")
    deepbooru.model = type("DeepDanbooru", (), {"tag": lambda self, image: "1girl, star"})()
    monkeypatch.setitem(sys.modules, "modules.deepbooru", deepbooru)
    monkeypatch.setattr(webui.modules, "deepbooru", deepbooru, raising=False)
    captioners = webui_host.captioners()
    image = Image.new("RGBA", (8, 8))
    assert captioners["BLIP"](image) == "blip RGB" and captioners["DeepBooru"](image) == "1girl, star"


# ---- names and defaults ------------------------------------------------------------------------


def test_versioned_names_never_reuse_a_stem(tmp_path):
    assert versioned_output_name(tmp_path / "missing", "cat") == "cat"
    (tmp_path / "cat.safetensors").touch()
    assert versioned_output_name(tmp_path, "cat") == "cat_v2"
    (tmp_path / "cat_v2-000001.safetensors").touch()
    assert versioned_output_name(tmp_path, "cat") == "cat_v3" and versioned_output_name(tmp_path, "cat_v3") == "cat_v3"


def test_config_defaults_follow_the_webui(webui):
    webui.shared.opts.data["CLIP_stop_at_last_layers"] = 2
    assert webui_host.config_defaults() == {"clip_skip": 2, "mixed_precision": "no"}
    webui.shared.cmd_opts.train_lora_output_dir = str(webui.root / "elsewhere")
    assert webui_host.output_dir() == webui.root / "elsewhere"


# ---- SD2 and SDXL ------------------------------------------------------------------------------


@pytest.fixture
def webui_sdxl(tmp_path, monkeypatch):
    env = fake_webui.install(tmp_path, monkeypatch, arch="sdxl")
    yield env
    fake_webui.uninstall()


@pytest.fixture
def webui_sd2(tmp_path, monkeypatch):
    env = fake_webui.install(tmp_path, monkeypatch, arch="sd2")
    yield env
    fake_webui.uninstall()


def test_sdxl_text_conditioning_is_both_embedders_with_bigg_attention_hookable_and_exact(webui_sdxl):
    """Inside the session bigG's nn.MultiheadAttention runs through hookable q/k/v/out children: the same
    numbers as torch's own forward, with gradients reaching te2's q/k/v adapters; all undone on exit."""
    sd_model = webui_sdxl.shared.sd_model
    clip_l, big_g = sd_model.conditioner.embedders[:2]
    with torch.no_grad():
        expected_g, expected_pooled = big_g(["a zkz star"])
        expected = torch.cat([clip_l(["a zkz star"]), expected_g], dim=-1)
    with open_webui_host(TrainConfig()) as host:
        assert host.arch == "sdxl" and [t.prefix for t in host.text_encoders] == ["lora_te1", "lora_te2"]
        network = make_network(None, host.text_encoders, network_dim=2, network_alpha=2.0)
        assert sum(n.startswith("lora_te2_") for n in network.module_names()) == 6 * len(big_g.wrapped.model.transformer.resblocks)
        with torch.no_grad():
            cond = host.encode_text(["a zkz star"], clip_skip=1)
        assert torch.allclose(cond.context, expected, atol=1e-5) and torch.allclose(cond.pooled, expected_pooled, atol=1e-5)
        for module in network.adapters():
            torch.nn.init.normal_(module.lora_up.weight)
        with network:
            cond = host.encode_text(["a zkz star"], clip_skip=1)
            (cond.context.square().mean() + cond.pooled.square().mean()).backward()
    grads = {m.lora_name: m.lora_up.weight.grad for m in network.adapters()}
    for name in ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
                 "lora_te2_text_model_encoder_layers_1_self_attn_out_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    attention = big_g.wrapped.model.transformer.resblocks[0].attn
    assert "q_proj" not in attention._modules and "forward" not in vars(attention)


def test_sdxl_run_trains_unet_and_both_encoders_and_saves_an_sdxl_file(webui_sdxl, dataset):
    config = config_for(dataset, sample_every_n_steps=2, sample_prompts=("zkz star --s 2 --w 64 --h 64",), gradient_checkpointing=True)
    with open_webui_host(config) as host:
        latents = host.encode_pixels(torch.zeros(1, 3, 64, 64))
        result = train(config, host)
    assert latents.shape == (1, 4, 16, 16)
    lora = load_lora(result.final_path)
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0" and lora.metadata["ss_sd_model_name"] == "tinyxl"
    names = set(lora.modules)
    assert {n.split("_text_model")[0] for n in names if "_text_model" in n} == {"lora_te1", "lora_te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names  # kohya's ldm-style SDXL UNet names
    assert webui_sdxl.modules.processing.records[0]["hooks_live"]
    assert not any(m._forward_hooks or "forward" in vars(m) for m in webui_sdxl.shared.sd_model.modules())


def test_sd2_run_trains_23_of_24_openclip_layers_as_kohya_names_them(webui_sd2, dataset):
    config = config_for(dataset)
    with open_webui_host(config) as host:
        assert host.arch == "sd2" and host.schedule.parameterization == "v"
        result = train(config, host)
    lora = load_lora(result.final_path)
    layers = len(webui_sd2.shared.sd_model.cond_stage_model.wrapped.model.transformer.resblocks)
    text = {n for n in lora.modules if n.startswith("lora_te_")}
    assert len(text) == 6 * (layers - 1) and not any(f"_layers_{layers - 1}_" in n for n in text)
    assert lora.metadata["ss_base_model_version"] == "sd_v2_v" and lora.metadata["ss_v2"] == "True"
    assert lora.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_attention_functions_the_session_swaps_are_given_back_exactly(webui, monkeypatch):
    """undo_optimizations() puts ldm's VAE attention forward on sgm's AttnBlock, and an optimizer that leaves
    AttnBlock alone (InvokeAI, the webui's CPU default) never puts sgm's back: SDXL images drifted after training."""
    import types

    modules = {}
    for package in ("ldm", "sgm"):
        model = types.ModuleType(f"{package}.modules.diffusionmodules.model")
        model.nonlinearity = lambda x: x
        model.AttnBlock = type("AttnBlock", (), {"forward": lambda self, x: x})
        attention = types.ModuleType(f"{package}.modules.attention")
        attention.CrossAttention = type("CrossAttention", (), {"forward": lambda self, x: x})
        modules[package] = (model, attention)
        monkeypatch.setitem(sys.modules, model.__name__, model)
        monkeypatch.setitem(sys.modules, attention.__name__, attention)
    originals = {p: (m.nonlinearity, m.AttnBlock.forward, a.CrossAttention.forward) for p, (m, a) in modules.items()}
    sgm_model = modules["sgm"][0]

    def undo():  # as the webui's: ldm's functions everywhere, sgm's VAE attention included
        sgm_model.AttnBlock.forward = modules["ldm"][0].AttnBlock.forward

    monkeypatch.setattr(webui.modules.sd_hijack, "undo_optimizations", undo)
    with open_webui_host():
        assert sgm_model.AttnBlock.forward is originals["ldm"][1]
    assert {p: (m.nonlinearity, m.AttnBlock.forward, a.CrossAttention.forward) for p, (m, a) in modules.items()} == originals
