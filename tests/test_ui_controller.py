"""The tab's actions on a real (tiny) model: train in the background, interrupt, resume, compare, keep."""

import threading

import pytest

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.train.config import TrainConfig
from lib_lora.train.presets import DEMO
from lib_lora.ui.controller import BusyError, CompareRequest, TabController, latest_run
from lib_lora.ui.fields import config_widget_values
from lib_lora.ui.settings import TabSettings


class StopOnce(StandaloneHost):
    """Asks the trainer to stop after its second step, once."""

    stopped = False

    def report(self, event) -> None:
        if event.kind == "step" and event.step == 2 and not self.stopped:
            self.stopped = True
            self.interrupt()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data") / "ds", n_images=4, repeats=1)


def values(dataset, **changes):
    base = dict(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=2, max_train_epochs=2, network_dim=4, network_alpha=4.0,
                learning_rate=1e-3, output_name="t", save_every_n_epochs=1, trigger_words="zkz")
    return config_widget_values(TrainConfig(**(base | changes)))


def test_train_compare_and_keep(dataset, tiny_checkpoint_path, tmp_path):
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    made = []
    controller = TabController(lambda: made.append(1) or host, TabSettings(presets_dir=tmp_path / "presets"))
    assert made == []  # the host is made only when work needs it
    widgets = values(dataset)
    assert controller.summary(widgets).total_steps == 4
    job = controller.start(widgets)
    assert job.wait(120)
    state = controller.snapshot()
    assert state.status == "finished" and state.step == 4 and len(state.losses) == 4 and made == [1]
    assert [f.label for f in controller.saved_files(widgets)] == ["epoch 1", "final"]

    grid = controller.comparison(widgets, CompareRequest("a zkz star", "0, 1", seed=1, steps=2))
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    message = controller.keep(widgets, "epoch 1", "t_e1", replace_existing=False, delete_epochs=True)
    assert message == "kept t-000001.safetensors as t_e1.safetensors; deleted 1 epoch file(s)"
    assert (host.lora_dir / "t_e1.safetensors").is_file() and not (host.lora_dir / "t-000001.safetensors").exists()
    with pytest.raises(ValueError, match="already exists"):
        controller.keep(widgets, "final", "t_e1", replace_existing=False, delete_epochs=False)


def test_interrupt_then_resume_the_last_run(dataset, tiny_checkpoint_path, tmp_path):
    host = StopOnce.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    controller = TabController(host)
    controller.start(values(dataset, output_name="r")).wait(120)
    first = controller.snapshot()
    assert first.status == "interrupted" and first.step == 2 and first.result.final_path.name == "r-step00000002.safetensors"
    assert latest_run(host.runs_dir) == first.result.run_dir
    controller.start({}, resume=True).wait(120)
    second = controller.snapshot()
    assert second.status == "finished" and second.step == 4 and second.result.run_dir == first.result.run_dir
    assert second.losses[0][0] == 3  # continued at step 3, not from the start


def test_a_bad_option_fails_the_start_without_a_host(dataset):
    controller = TabController(lambda: pytest.fail("no host needed"))
    job = controller.start({**values(dataset), "resolution": "100"})
    assert job.snapshot().status == "failed" and "resolution: 100" in job.snapshot().error
    assert controller.interrupt() == "nothing is training"


def test_the_model_is_refused_while_training_holds_it(dataset, tiny_checkpoint_path, tmp_path):
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    release = threading.Event()
    controller = TabController(lambda: release.wait(30) and host)
    controller.start(values(dataset, output_name="b"))
    with pytest.raises(BusyError, match="busy"):
        controller.comparison(values(dataset, output_name="b"), CompareRequest("x"))
    with pytest.raises(BusyError):
        with controller.use_model("txt2img"):
            pass
    running = controller.job
    with pytest.raises(BusyError, match="b is training, so no second run was started"):
        controller.start(values(dataset, output_name="c"))
    assert controller.job is running  # the tab goes on following the first run
    release.set()
    assert controller.job.wait(120) and controller.snapshot().status == "finished"


def test_presets_through_the_controller(dataset, tmp_path):
    controller = TabController(lambda: None, TabSettings(presets_dir=tmp_path, defaults=DEMO))
    initial = controller.initial_values()
    assert initial["resolution"] == "64" and initial["network_type"] == "locon"
    loaded, message = controller.apply_preset("style", {**initial, "train_data_dir": str(dataset)})
    assert loaded["train_data_dir"] == str(dataset) and loaded["network_type"] == "locon" and loaded["resolution"] == "512"
    assert message.startswith("loaded preset style: LoCon")
    assert "saved preset mine" in controller.save_preset("mine", {**loaded, "network_dim": 24}, overwrite=False)
    assert "mine" in controller.preset_names()
    again, _ = controller.apply_preset("mine", initial)
    assert again["network_dim"] == 24 and again["train_data_dir"] == ""
