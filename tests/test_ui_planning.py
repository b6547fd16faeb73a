"""Live step math and warnings for the tab, on real dataset folders."""

import pytest

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.train.base_model import BaseModel
from lib_lora.train.config import TrainConfig
from lib_lora.ui import planning
from lib_lora.ui.fields import config_widget_values
from lib_lora.ui.status import repeats_html, summary_html


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data") / "ds", n_images=12, repeats=10)


def widgets(**changes):
    return config_widget_values(TrainConfig(**{"resolution": (64, 64), "trigger_words": "zkz", **changes}))


def test_step_math_is_images_times_repeats_times_epochs_over_batch(dataset):
    summary = planning.summarize(widgets(train_data_dir=str(dataset), train_batch_size=4, max_train_epochs=3))
    assert summary.total_steps == 90 and not summary.error
    assert summary.steps_text.startswith("12 images x 10 repeats = 120 samples / batch 4 = 30 steps per epoch x 3 epochs")
    assert summary.repeats == ["10_zkz: 12 images x 10 repeats = 120"]
    assert "90 steps" in summary_html(summary) and "10_zkz" in repeats_html(summary)


def test_step_math_counts_regularization_samples_apart(dataset, tmp_path):
    """Kohya balances reg samples to the train samples; the line must not fold them into the repeats."""
    reg = make_lora_dataset(tmp_path / "reg", concept="purple", trigger="shape", n_images=4, repeats=1)
    summary = planning.summarize(widgets(train_data_dir=str(dataset), reg_data_dir=str(reg), train_batch_size=4, max_train_epochs=3))
    assert summary.steps_text.startswith(
        "12 images x 10 repeats = 120 samples + 120 regularization = 240 samples / batch 4 = 60 steps per epoch x 3 epochs"
    )
    assert summary.total_steps == 180


@pytest.mark.parametrize("changes, expected", [
    (dict(network_dim=4, network_alpha=8.0), "network_alpha 8.0 > network_dim 4"),
    (dict(network_type="locon", conv_dim=2, conv_alpha=4.0), "conv_alpha 4.0 > conv_dim 2"),
    (dict(optimizer_type="AdamW", learning_rate=1e-2), "learning_rate 0.01 is outside 1e-05..0.001"),
    (dict(optimizer_type="AdamW", unet_lr=1e-7), "unet_lr 1e-07 is outside"),
    (dict(optimizer_type="Prodigy", learning_rate=1e-4), "Prodigy adapts the step size"),
    (dict(optimizer_type="Prodigy", learning_rate=5.0), "learning_rate 5 is outside 0.1..2"),
    (dict(optimizer_type="Lion", learning_rate=1e-3), "usual range for Lion"),
    (dict(torch_compile=True, module_dropout=0.1), "breaks torch_compile's graph at every module"),
])
def test_option_warnings(dataset, changes, expected):
    for folder in (str(dataset), ""):  # with and without a dataset chosen
        summary = planning.summarize(widgets(train_data_dir=folder, **changes))
        assert any(expected in w for w in summary.warnings), (folder, summary.warnings)


def test_sensible_options_give_no_warning(dataset):
    assert planning.summarize(widgets(train_data_dir=str(dataset), train_batch_size=4)).warnings == []


@pytest.mark.parametrize("model, changes, expected", [
    (BaseModel("sdxl"), dict(resolution=(512, 512)), "the base model (SDXL) was trained at 1024 px; 512x512 is far below it"),
    (BaseModel("sd1"), dict(resolution=(1024, 1024)), "the base model (SD1) was trained at 512 px; 1024x1024 is far above it: 4.0x the memory"),
    (BaseModel("sd2", "v"), dict(resolution=(512, 512)), "the base model (SD2 768-v) was trained at 768 px"),
    (BaseModel("sd1", size=64), dict(resolution=(512, 512)), "the base model (SD1) was trained at 64 px"),  # the embedded model
    (BaseModel("sdxl"), dict(resolution=(1024, 1024), clip_skip=2), "clip_skip 2 is ignored on SDXL"),
    (BaseModel("sd2", "v"), dict(resolution=(768, 768), clip_skip=2), "clip_skip 2 is ignored on SD2"),
    (BaseModel("sdxl"), dict(resolution=(1024, 1024), zero_terminal_snr=True), "zero_terminal_snr on an eps-prediction model"),
    (None, dict(zero_terminal_snr=True), "zero_terminal_snr on an eps-prediction model"),  # kohya's check, on the options alone
])
def test_advice_on_the_base_model(dataset, model, changes, expected):
    for folder in (str(dataset), ""):  # with and without a dataset chosen
        summary = planning.summarize(widgets(train_data_dir=folder, train_batch_size=4, **changes), model=model)
        assert any(expected in w for w in summary.warnings), (folder, summary.warnings)


@pytest.mark.parametrize("model, changes", [
    (BaseModel("sd1"), dict(resolution=(768, 768), clip_skip=2)),  # SD1 at 768 px is still usual; clip skip is SD1's
    (BaseModel("sd2", "eps"), dict(resolution=(512, 512))),  # SD2 512-base
    (BaseModel("sd2", "v"), dict(resolution=(768, 768), zero_terminal_snr=True)),
    (BaseModel("sdxl"), dict(resolution=(832, 1216))),  # one of SDXL's own aspect buckets
    (BaseModel("sdxl", "v"), dict(resolution=(1024, 1024), zero_terminal_snr=True)),  # v-pred SDXL fine-tunes trained so
    (BaseModel("sdxl"), dict(resolution=(1024, 1024), zero_terminal_snr=True, v_parameterization=True)),  # the file did not say v
    (BaseModel("sd1", size=64), dict(resolution=(64, 64))),  # the embedded model at its own size
    (None, dict(resolution=(64, 64), clip_skip=2)),  # the model not known yet: no guess
])
def test_options_that_fit_the_base_model_give_no_advice(dataset, model, changes):
    assert planning.summarize(widgets(train_data_dir=str(dataset), train_batch_size=4, **changes), model=model).warnings == []


def test_a_tiny_dataset_is_warned_about(tmp_path):
    small = make_lora_dataset(tmp_path / "small", n_images=3, repeats=2)
    summary = planning.summarize(widgets(train_data_dir=str(small), train_batch_size=2))
    assert any("only 3 training image(s)" in w for w in summary.warnings)


def test_a_batch_larger_than_the_dataset_blocks_the_start(tmp_path):
    small = make_lora_dataset(tmp_path / "small", n_images=3, repeats=2)
    summary = planning.summarize(widgets(train_data_dir=str(small), train_batch_size=8))
    assert "batch size 8 is larger than the dataset (6 samples" in summary.error and summary.total_steps == 0


def test_a_resolution_off_the_64_grid_is_named(dataset):
    summary = planning.summarize({**widgets(train_data_dir=str(dataset)), "resolution": "500"})
    assert summary.error.startswith("resolution: 500 is not a positive multiple of 64")
    assert "resolution" in summary_html(summary)


def test_no_folder_and_a_missing_folder_are_errors_not_crashes(tmp_path):
    assert "choose a dataset folder" in planning.summarize(widgets()).error
    assert "does not exist" in planning.summarize(widgets(train_data_dir=str(tmp_path / "nope"))).error


def test_the_plan_is_cached_until_the_folders_or_data_options_change(dataset, tmp_path):
    calls = []
    cache = planning.PlanCache(lambda config: calls.append(config) or planning.plan_training(config))
    folder = make_lora_dataset(tmp_path / "ds", n_images=6, repeats=1)
    planning.summarize(widgets(train_data_dir=str(folder), train_batch_size=2), cache)
    planning.summarize(widgets(train_data_dir=str(folder), train_batch_size=2, learning_rate=5e-4), cache)  # not a data option
    assert len(calls) == 1
    planning.summarize(widgets(train_data_dir=str(folder), train_batch_size=3), cache)
    assert len(calls) == 2
    extra = folder / "2_more"
    extra.mkdir()
    (folder / "1_zkz" / "img_000.png").rename(extra / "img_000.png")
    summary = planning.summarize(widgets(train_data_dir=str(folder), train_batch_size=3), cache)
    assert len(calls) == 3 and any("2_more" in line for line in summary.repeats)
