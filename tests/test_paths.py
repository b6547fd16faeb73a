"""Paths from the tab and the HTTP API stay inside the folders the server allows (issue #19): datasets under the
dataset roots (--dataset-root, webui --train-lora-dataset-root), LoRA files under the Lora folder, resumed runs
from the runs folder; each path resolved first (symlinks, `..`), each refusal naming the field and the root.
The standalone app binds to 127.0.0.1 and warns when told to serve on another address.
"""
import argparse

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.train.config import ConfigError, TrainConfig
from lib_lora.ui.api import PREFIX, add_api_routes
from lib_lora.ui.cli import add_ui_command
from lib_lora.ui.controller import TabController
from lib_lora.ui.settings import TabSettings


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """root/ds (a dataset), outside/ds (another), root/link -> outside/ds, and the Lora and runs folders."""
    base = tmp_path_factory.mktemp("paths")
    root, outside = base / "root", base / "outside"
    make_lora_dataset(root / "ds", n_images=4, repeats=1)
    make_lora_dataset(outside / "ds", n_images=4, repeats=1)
    (root / "link").symlink_to(outside / "ds")
    return {"root": root, "inside": root / "ds", "outside": outside / "ds", "link": root / "link", "lora": base / "lora", "runs": base / "runs"}


def no_host():
    pytest.fail("a refused path must be refused before the model is needed")


@pytest.fixture
def controller(folders):
    settings = TabSettings(lora_dir=folders["lora"], runs_dir=folders["runs"], dataset_roots=(folders["root"],))
    return TabController(no_host, settings)


@pytest.fixture
def api(controller):
    app = FastAPI()
    add_api_routes(app, controller)
    return TestClient(app)


def run_values(folders, **changes) -> dict:
    return {"train_data_dir": str(folders["inside"]), "output_name": "p", "resolution": "64", "train_batch_size": 2} | changes


ESCAPES = [  # (case, field, value given, how the message shows it)
    ("outside", "train_data_dir", lambda f: f["outside"], lambda f: f"{f['outside']} is outside"),
    ("dot dot", "train_data_dir", lambda f: f["root"] / ".." / "outside" / "ds", lambda f: f"(that is {f['outside']}) is outside"),
    ("symlink out", "train_data_dir", lambda f: f["link"], lambda f: f"(that is {f['outside']}) is outside"),
    ("reg outside", "reg_data_dir", lambda f: f["outside"], lambda f: f"{f['outside']} is outside"),
    ("NUL", "train_data_dir", lambda f: f"{f['root']}/d\x00s", lambda f: "is not a usable path"),
]


@pytest.mark.parametrize("case, field, given, shown", ESCAPES, ids=[c[0] for c in ESCAPES])
def test_dataset_folders_outside_the_root_are_refused_by_the_controller(folders, controller, case, field, given, shown):
    values = run_values(folders, **{field: str(given(folders))})
    summary = controller.summary(values)
    assert summary.error.startswith(f"{field}: ") and shown(folders) in summary.error and summary.total_steps == 0
    if case != "NUL":
        assert f"the dataset root(s) this server allows (--dataset-root, webui: --train-lora-dataset-root): {folders['root']}" in summary.error
    with pytest.raises(ConfigError, match=f"^{field}: "):
        controller.report(values)
    job = controller.start(values)
    assert job.snapshot().status == "failed" and job.snapshot().error == summary.error


def test_a_dataset_inside_the_root_is_scanned(folders, controller):
    assert controller.summary(run_values(folders)).total_steps == 2
    assert len(controller.thumbnails(str(folders["inside"]))) == 4
    with pytest.raises(ConfigError, match="^train_data_dir: .* is outside"):
        controller.thumbnails(str(folders["link"]))
    with pytest.raises(ConfigError, match="^train_data_dir: .* is outside"):  # captioning writes beside the images
        controller.caption(str(folders["outside"]), "BLIP", "ignore", ".txt")


def test_without_roots_any_dataset_folder_is_read(folders):
    controller = TabController(no_host, TabSettings(lora_dir=folders["lora"], runs_dir=folders["runs"]))
    assert controller.summary(run_values(folders, train_data_dir=str(folders["outside"]))).total_steps == 2


@pytest.mark.parametrize("route", ["/runs", "/queue"])
@pytest.mark.parametrize("field, value", [("train_data_dir", "outside"), ("train_data_dir", "link"), ("reg_data_dir", "outside"),
                                          ("output_dir", "root")])
def test_the_api_refuses_paths_outside_the_allowed_folders_with_422(folders, api, route, field, value):
    answer = api.post(PREFIX + route, json=run_values(folders, **{field: str(folders[value])}))
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.json()
    assert "is outside" in answer.json()["error"]
    assert api.get(PREFIX + "/queue").json()["jobs"] == []


def test_output_dir_inside_the_lora_folder_is_allowed_and_outside_refused(folders, controller):
    controller.check_paths(controller_config(folders, output_dir=str(folders["lora"] / "characters")))
    with pytest.raises(ConfigError, match=rf"^output_dir: .* is outside the Lora folder {folders['lora']}"):
        controller.saved_files({"output_dir": str(folders["root"]), "output_name": "p"})
    with pytest.raises(ConfigError, match=r"^output_dir: .*\(that is .*\) is outside the Lora folder"):
        controller.check_paths(controller_config(folders, output_dir=str(folders["lora"] / ".." / "escape")))


def controller_config(folders, **changes):
    return TrainConfig(train_data_dir=str(folders["inside"]), resolution=(64, 64), **changes)


def test_resume_reads_only_from_the_runs_folder(folders, controller, api):
    job = controller.start({}, resume=True, run_dir=str(folders["root"]))
    assert job.snapshot().status == "failed" and job.snapshot().error.startswith(f"run_dir: {folders['root']} is outside the runs folder")
    for name in ["..", "../root", "%2e%2e"]:
        assert api.post(f"{PREFIX}/runs/{name}/resume").status_code in (404, 405)


@pytest.mark.parametrize("name, words", [("CON", "Windows device name"), ("..", "names a folder"), ("a/b", "contains /"),
                                         ("x" * 300, "300 bytes long"), ("a\x00", "control character")])
def test_keep_as_refuses_names_that_are_not_one_file(folders, controller, name, words):
    with pytest.raises(ValueError, match=f"final name .* {words}"):
        controller.keep({"output_name": "p"}, "final", name, replace_existing=False, delete_epochs=False)


def test_the_app_binds_to_this_machine_unless_told_and_warns_when_not():
    from lib_lora.ui.app import exposure_warning

    parser = argparse.ArgumentParser()
    add_ui_command(parser.add_subparsers())
    args = parser.parse_args(["ui", "--dataset-root", "/data", "--dataset-root", "/more"])
    assert args.bind == "127.0.0.1" and [str(p) for p in args.dataset_root] == ["/data", "/more"]
    for bind in ("127.0.0.1", "localhost", "::1"):
        assert exposure_warning(bind, None, ()) is None
    warning = exposure_warning("0.0.0.0", None, ())
    assert warning.startswith("warning: serving on 0.0.0.0: anyone who can reach this machine") and "in any folder this user can read" in warning
    assert "set --api-auth USER:PASS for the HTTP API and --dataset-root FOLDER" in warning
    guarded = exposure_warning("192.168.1.5", "u:p", (args.dataset_root[0],))
    assert "under /data" in guarded and "set --" not in guarded


@pytest.mark.parametrize("extension", ["/../../etc/x", ".a/b", ".t\\x", ".txt\x00", "..", ". txt"])
def test_a_caption_extension_cannot_name_a_file_elsewhere(extension):
    with pytest.raises(ConfigError, match=r"^caption_extension: .* is not a file extension; use letters, digits, _ or - after one leading dot"):
        TrainConfig(caption_extension=extension)


@pytest.mark.parametrize("extension", [".txt", "caption", ".tags", ".wd14-tags"])
def test_plain_caption_extensions_are_accepted(extension):
    assert TrainConfig(caption_extension=extension).caption_extension == extension
