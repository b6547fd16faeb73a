"""The tab on SD1 and SDXL models (tiny, random): its preset list and its advice follow the loaded architecture."""

import pytest

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.hosts.webui import WebuiHostError
from lib_lora.models.checkpoint import save_checkpoint
from lib_lora.train.config import TrainConfig
from lib_lora.train.dataset import plan_training
from lib_lora.train.presets import BUILTIN_PRESETS, DEMO
from lib_lora.ui.controller import TabController
from lib_lora.ui.fields import config_from_widgets, config_widget_values
from lib_lora.ui.settings import TabSettings

SDXL_PRESETS = ["SDXL character", "SDXL style", "SDXL concept"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    made = {}
    for arch in ("sd1", "sdxl"):
        save_checkpoint(random_tiny_checkpoint(0, arch), out / f"{arch}.safetensors")
        made[arch] = StandaloneHost.from_file(out / f"{arch}.safetensors", out_dir=out / arch, device="cpu")
    return made


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data") / "ds", n_images=12, repeats=10)


def loaded(controller: TabController, preset: str, dataset) -> dict:
    """Widget values after choosing a dataset and loading a preset, as a user would."""
    values = config_widget_values(TrainConfig(train_data_dir=str(dataset), trigger_words="zkz"))
    return controller.apply_preset(preset, values)[0]


def test_the_preset_list_follows_the_models_architecture(hosts, tmp_path):
    settings = TabSettings(presets_dir=tmp_path)
    mine = TabController(hosts["sd1"], settings)
    mine.save_preset("mine", config_widget_values(TrainConfig(network_dim=8)), overwrite=False)
    assert TabController(hosts["sdxl"], settings).preset_names() == [*SDXL_PRESETS, "mine"]
    assert mine.preset_names() == ["anime character", "realistic character", "style", "concept", "demo (embedded tiny model)", "mine"]


def test_an_sdxl_preset_on_sdxl_trains_at_1024_in_sdxl_buckets_without_advice(hosts, dataset):
    controller = TabController(hosts["sdxl"])
    values = loaded(controller, "SDXL concept", dataset)
    assert values["resolution"] == "1024" and values["train_data_dir"] == str(dataset)  # the dataset is kept
    data = plan_training(config_from_widgets(values))
    assert (1024, 1024) in data.buckets and (512, 2048) in data.buckets and (2048, 512) in data.buckets
    assert all(512 <= side <= 2048 and w * h <= 1024 * 1024 for w, h in data.buckets for side in (w, h))
    summary = controller.summary(values)
    assert summary.total_steps == 600 and summary.warnings == []  # 12 images x 10 repeats / batch 2 x 10 epochs


def test_an_sd1_preset_on_sdxl_is_advised_against(hosts, dataset):
    values = loaded(TabController(hosts["sdxl"]), "anime character", dataset)  # a preset file, or the webui's list of an earlier model
    warnings = TabController(hosts["sdxl"]).summary(values).warnings
    assert any(w.startswith("the base model (SDXL) was trained at 1024 px; 512x512 is far below it") for w in warnings), warnings
    assert any(w.startswith("clip_skip 2 is ignored on SDXL") for w in warnings)
    assert TabController(hosts["sd1"]).summary(values).warnings == []  # the same options on SD1: nothing to say


def test_the_embedded_model_is_advised_at_its_own_64_px(tmp_path):
    controller = TabController(StandaloneHost.from_file(None, out_dir=tmp_path, device="cpu"))
    demo = config_widget_values(TrainConfig(**DEMO, trigger_words="zkz"))
    assert not any("trained at" in w for w in controller.summary(demo).warnings)
    assert any("the base model (SD1) was trained at 64 px" in w for w in controller.summary({**demo, "resolution": "512"}).warnings)


def test_a_host_factory_is_asked_only_when_the_preset_list_opens_and_its_answer_kept(hosts):
    answers = [WebuiHostError("No Stable Diffusion checkpoint is loaded."), hosts["sdxl"]]
    calls = []

    def factory():  # the webui's: no model at first, then SDXL
        calls.append(1)
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    controller = TabController(factory)
    sd1_values = config_widget_values(TrainConfig(**BUILTIN_PRESETS["anime character"].values))
    assert controller.preset_names() == list(BUILTIN_PRESETS) and controller.summary(sd1_values).warnings == []
    assert calls == []  # building the tab and the live summary never touch the webui's model
    assert controller.preset_names(ask=True) == list(BUILTIN_PRESETS) and calls == [1]  # opened with no model yet: every preset
    assert controller.preset_names(ask=True) == SDXL_PRESETS and calls == [1, 1]  # opened again once SDXL is loaded
    assert controller.preset_names() == SDXL_PRESETS and calls == [1, 1]  # saving a preset lists them again, without asking
    assert any("was trained at 1024 px" in w for w in controller.summary(sd1_values).warnings) and calls == [1, 1]
