"""The Forge host on a stand-in Forge (tests/fake_forge) around our tiny models.

Forge builds its model under inference mode with its own Linear class, loads it on the first
generation, moves and LoRA-merges it through its memory manager, and reads LoRA files through a
loader that drops a file past 12 unmapped keys and caches by path. These tests train through all of
that and check what a Forge user would see: the run finishes and saves, the file is listed and loads
whole, a sample's LoRA never leaks into training, and the model is given back as it was.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fake_forge
from lib_lora.hosts.forge import ForgeTab, open_forge_host
from lib_lora.hosts.webui import WebuiHostError
from lib_lora.models.pipeline import GenerationParams
from lib_lora.networks.network import make_network
from lib_lora.networks.targets import text_targets, unet_targets
from lib_lora.train.trainer import train
from test_webui_host import config_for, dataset  # noqa: F401  (dataset: a fixture; config_for trains UNet and text encoders)
from test_webui_script import ROOT, run_file, tab_builder  # noqa: F401  (tab_builder: a fixture)


@pytest.fixture
def forge(request, tmp_path, monkeypatch):
    """The stand-in Forge with the tiny SD1 model loaded (SDXL: parametrize "forge" with "sdxl", indirect)."""
    env = fake_forge.install(tmp_path, monkeypatch, arch=getattr(request, "param", "sd1"))
    yield env
    fake_forge.uninstall()


def unet_weights(env) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in env.shared.sd_model.forge_objects_original.unet.model.state_dict().items()}


def a_query(unet: nn.Module) -> nn.Module:
    return next(m for name, m in unet.named_modules() if name.endswith("attn1.to_q"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the model as Forge builds it --------------------------------------------------------------


def test_forge_linear_layers_are_targets_as_torch_ones_are(forge):
    """ForgeOperations.Linear is no nn.Linear; adapters find it by name and shape, so a kohya file has every layer."""
    from lib_lora.demo.tiny import random_tiny_checkpoint

    objects = forge.shared.sd_model.forge_objects
    unet, clip_l = objects.unet.model.diffusion_model, objects.clip.cond_stage_model.clip_l.transformer
    assert not isinstance(a_query(unet), nn.Linear)
    ours = random_tiny_checkpoint(0, "sd1")
    forge_names = [t.name for t in unet_targets(unet, include_conv=True, num_res_blocks=1)]
    assert forge_names == [t.name for t in unet_targets(ours.unet, include_conv=True, num_res_blocks=1)]
    assert len(text_targets(clip_l)) == 6 * len(clip_l.text_model.encoder.layers)


def test_a_packed_low_bit_linear_is_no_target(forge):
    unet = forge.shared.sd_model.forge_objects.unet.model.diffusion_model
    layer = a_query(unet)
    layer.weight = nn.Parameter(torch.zeros(layer.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)  # nf4-like storage
    assert layer not in [t.layer for t in unet_targets(unet, False, 1)]


# ---- the session ---------------------------------------------------------------------------------


def test_the_session_loads_the_selected_model_under_the_lock_and_gives_the_weights_back(tmp_path, monkeypatch):
    env = fake_forge.install(tmp_path, monkeypatch, loaded=False)  # Forge loads a checkpoint at the first generation
    try:
        with open_forge_host() as host:
            assert env.calls[:3] == ["lock.acquire", "state.begin(train-lora)", "forge_model_reload"]
            assert env.modules.call_queue.queue_lock.locked() and host.arch == "sd1" and host.unet is not None
            before = unet_weights(env)
            assert not any(p.requires_grad for p in host.base_parameters())
        assert env.calls[-2:] == ["state.end", "lock.release"]
        assert same_weights(before, unet_weights(env))
    finally:
        fake_forge.uninstall()


def test_schedule_is_forges_sigmas_and_latents_the_scaled_posterior_mean(forge):
    from lib_lora.models.schedule import sd_alphas_cumprod

    with open_forge_host() as host:
        assert torch.allclose(host.schedule.alphas_cumprod, sd_alphas_cumprod(), rtol=1e-5) and host.schedule.parameterization == "eps"
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        vae = host.vae.first_stage_model.vae
        assert torch.allclose(host.encode_pixels(pixels), vae.encode(pixels), atol=1e-6)  # our VAE's encode: mean * scale


def test_text_encoder_adapters_get_gradients_through_forges_engine_with_clip_skip(forge):
    engine = forge.shared.sd_model.text_processing_engine
    with open_forge_host() as host:
        network = make_network(None, host.text_encoders, network_dim=2, network_alpha=2.0, device=host.device)
        for module in network.adapters():
            nn.init.normal_(module.lora_up.weight)
        with network:
            skipped = host.encode_text(["a star"], clip_skip=2)
            assert engine.clip_skip == 1  # Forge's own setting comes back
            full = host.encode_text(["a star"], clip_skip=1)
            full.context.sum().backward()
        assert not torch.equal(skipped.context, full.context)
        assert all(m.lora_down.weight.grad is not None for m in network.adapters())


def test_refused_models_say_why_and_release_the_lock(forge):
    cases = [(lambda m: setattr(m, "is_sd1", False), "SD1.x and SDXL"), (lambda m: setattr(m, "is_inpaint", True), "inpainting"),
             (lambda m: setattr(m.forge_objects_original.unet.model, "storage_dtype", torch.float8_e4m3fn), "Diffusion in Low Bits")]
    for change, words in cases:
        change(forge.shared.sd_model)
        with pytest.raises(WebuiHostError, match=words):
            with open_forge_host():
                pass
        assert not forge.modules.call_queue.queue_lock.locked()
        forge.shared.sd_model = None
        forge.sd_models.forge_model_reload()


@pytest.mark.parametrize("forge", ["sdxl"], indirect=True)
def test_the_sdxl_refiner_is_refused(forge):
    del forge.shared.sd_model.text_processing_engine_l
    with pytest.raises(WebuiHostError, match="refiner"):
        with open_forge_host():
            pass


# ---- training, samples and the Lora loader -----------------------------------------------------


def forge_loads(env, name: str) -> str:
    """What Forge's Lora extension printed for `<lora:name:1>` in a sample."""
    return next(line for line in env.networks.log if name in line)


def test_a_short_sd1_run_saves_a_file_forge_loads_whole_and_gives_the_model_back(forge, dataset):
    before = unet_weights(forge)
    config = config_for(dataset, sample_every_n_steps=2, sample_prompts=("zkz star --s 1 --w 64 --h 64",), network_type="locon",
                        conv_dim=2, conv_alpha=2.0)
    with open_forge_host() as host:
        result = train(config, host)
        assert forge.processing.records[-1]["hooks_live"]  # the sample rendered with the training adapters
        host.generate(GenerationParams(prompt=f"zkz star <lora:{result.final_path.stem}:1>", steps=1, width=64, height=64, seed=1))
        assert forge.processing.records[-1]["loras"] == [str(result.final_path)]
        assert not same_weights(before, unet_weights(forge))  # merged by Forge for the sample
        host.unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]), torch.zeros(1, 77, 128))  # the next training forward
        assert same_weights(before, unet_weights(forge))  # ... gives the weights back first
    assert result.final_path.parent == host.lora_dir and result.final_path.stem in forge.networks.available_networks
    assert forge_loads(forge, result.final_path.name).endswith("unmatched keys []")
    assert any(k.startswith("lora_te_") for k in load_file(result.final_path)) and any("_resnets_" in k for k in load_file(result.final_path))
    forge.processing.process_images(forge.processing.StableDiffusionProcessingTxt2Img(prompt="zkz star", width=64, height=64))
    assert forge.processing.records[-1] | {"prompt": None} == {"prompt": None, "hooks_live": False, "loras": []}
    assert same_weights(before, unet_weights(forge))  # the user's next generation: no LoRA, no adapter


@pytest.mark.parametrize("forge", ["sdxl"], indirect=True)
def test_a_short_sdxl_run_trains_both_encoders_and_forge_loads_every_key(forge, dataset):
    with open_forge_host() as host:
        result = train(config_for(dataset), host)
        host.generate(GenerationParams(prompt=f"<lora:{result.final_path.stem}:1>", steps=1, width=64, height=64, seed=1))
    keys = load_file(result.final_path)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert forge_loads(forge, result.final_path.name).endswith("unmatched keys []")
    assert forge.processing.records[-1]["loras"] == [str(result.final_path)]


def test_a_file_written_again_under_its_name_is_the_one_forge_uses_once_registered(forge, dataset, tmp_path):
    with open_forge_host() as host:
        path = train(config_for(dataset, max_train_steps=1), host).final_path
        prompt = GenerationParams(prompt=f"<lora:{path.stem}:1>", steps=1, width=64, height=64, seed=1)
        host.generate(prompt)
        first = unet_weights(forge)
        save_file({k: v * 3 if "lora_up" in k else v for k, v in load_file(path).items()}, str(path))
        host.register_network(path)
        host.generate(prompt)
        assert not same_weights(first, unet_weights(forge))


def test_registering_a_file_after_a_sample_with_a_lora_leaves_the_next_plain_generation_plain(forge, dataset):
    """The tab registers each saved file after the run; the last sample may have merged a LoRA."""
    before = unet_weights(forge)
    with open_forge_host() as host:
        path = train(config_for(dataset), host).final_path
        host.generate(GenerationParams(prompt=f"zkz star <lora:{path.stem}:1>", steps=1, width=64, height=64, seed=1))
    host.register_network(path)
    forge.processing.process_images(forge.processing.StableDiffusionProcessingTxt2Img(prompt="zkz star", width=64, height=64))
    assert forge.processing.records[-1]["loras"] == [] and same_weights(before, unet_weights(forge))


def test_interrupt_from_forge_stops_the_run_and_saves(forge, dataset):
    with open_forge_host() as host:
        result = train(config_for(dataset, max_train_epochs=3), host, on_event=lambda e: e.kind == "step" and forge.shared.state.interrupt())
    assert result.interrupted and result.steps == 1 and result.final_path.is_file()


def test_the_forge_tab_binding_opens_forge_sessions(forge):
    tab = ForgeTab()
    with tab.session() as host:
        assert tab.host() is host
    assert isinstance(tab.host(), type(host)) and tab.host() is not host


def test_in_forge_the_script_gives_the_tab_the_forge_binding(forge, tab_builder):  # noqa: F811
    """Forge loads its model at the first generation, so the extension knows Forge by its `modules_forge` package."""
    run_file(ROOT / "scripts" / "train_lora.py", "train_lora.py")
    (on_ui_tabs,) = forge.modules.script_callbacks.registered["ui_tabs"]
    assert on_ui_tabs() == [("<blocks>", "Train LoRA", "train_lora")]  # a top-level tab, as in A1111
    ((host_factory, settings),) = tab_builder
    assert type(host_factory.__self__) is ForgeTab and settings.job_lock == host_factory.__self__.session
