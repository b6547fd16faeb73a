"""The HTTP API (/train-lora/v1/) on the standalone app's FastAPI app, training the embedded 64 px model.

The app is served as `python -m lib_lora ui` serves it (`serve`: Gradio's launch, then the API on its
FastAPI app), with --api-auth set; requests go through starlette's TestClient.
"""

import socket
import time

import pytest

pytest.importorskip("gradio")
import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_lora.demo.dataset import make_lora_dataset  # noqa: E402
from lib_lora.hosts.standalone import StandaloneHost  # noqa: E402
from lib_lora.ui.api import PREFIX, add_api_routes, config_from_json  # noqa: E402
from lib_lora.ui.app import AppOptions, create_app, serve  # noqa: E402
from lib_lora.ui.controller import TabController  # noqa: E402
from lib_lora.ui.settings import TabSettings  # noqa: E402

AUTH = ("tester", "s3cret:x")  # a colon in the password is kept
RUN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny steps are faster on one thread than fighting for two busy cores (10x on a loaded CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    host = StandaloneHost.from_file(None, out_dir=out, device="cpu")
    blocks, controller = create_app(host, AppOptions(out, embedded=True))
    app = serve(blocks, controller, port=free_port(), api_auth=f"other:pw,{AUTH[0]}:{AUTH[1]}")
    yield app, controller, host
    blocks.close()


@pytest.fixture(scope="module")
def client(served):
    return TestClient(served[0])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data") / "ds", n_images=4, repeats=1)


def job(dataset, name: str, **changes) -> dict:
    """A tiny run: 4 images, batch 2, 2 epochs = 4 steps at 64 px (the rest from the embedded model's defaults, less
    their class images)."""
    return dict(train_data_dir=str(dataset), output_name=name, resolution=64, network_type="lora", network_dim=4, network_alpha=4,
                train_batch_size=2, max_train_epochs=2, learning_rate=1e-3, trigger_words="zkz", num_class_images=0) | changes


def call(client, method: str, path: str, **kwargs):
    return client.request(method, PREFIX + path, auth=AUTH, **kwargs)


def wait_until(predicate, timeout: float = RUN_TIMEOUT_S, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"not reached within {timeout} s")


def settled(client) -> dict:
    """The progress once no run is active and no queued job is about to start."""
    def idle():
        progress = call(client, "GET", "/progress").json()
        return progress if progress["status"] not in ("starting", "running", "stopping") and not busy(client) else None
    return wait_until(idle)


def busy(client) -> bool:
    queue = call(client, "GET", "/queue").json()
    return bool(queue["jobs"]) and not queue["held"]


def test_start_follow_the_progress_and_find_the_file(client, dataset):
    started = call(client, "POST", "/runs", json=job(dataset, "api1", sample_prompts=["a zkz star --s 4 --d 1"], sample_every_n_epochs=1,
                                             save_every_n_epochs=1))
    assert started.status_code == 202 and started.json()["name"] == "api1" and started.json()["status"] in ("starting", "running")
    done = settled(client)
    assert done["status"] == "finished" and done["step"] == done["total_steps"] == 4 and done["epoch"] == 2
    assert done["loss"] > 0 and done["avg_loss"] > 0 and done["lr"] > 0 and done["final_path"].endswith("api1.safetensors")
    assert done["latest_sample"].endswith(".png") and done["latest_sample_url"] == f"{PREFIX}/progress/sample"
    image = client.get(done["latest_sample_url"], auth=AUTH)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"
    assert any(save.endswith("api1-000001.safetensors") for save in done["saves"])

    outputs = call(client, "GET", "/outputs").json()["outputs"]
    assert {"api1", "api1-000001"} <= {o["name"] for o in outputs} and all(o["bytes"] > 0 for o in outputs)
    runs = {r["name"]: r for r in call(client, "GET", "/runs").json()["runs"]}
    assert runs["api1"]["status"] == "finished" and runs["api1"]["step"] == 4 and runs["api1"]["final_path"] == done["final_path"]

    again = call(client, "POST", "/runs", json=job(dataset, "api1"))
    assert again.status_code == 422 and again.json()["field"] == "output_name" and "api1" in again.json()["error"]


@pytest.mark.parametrize(("body", "field"), [
    ({"resolution": 100}, "resolution"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"optimizer_type": "Adam"}, "optimizer_type"),
    ({"output_name": "a/b"}, "output_name"),
    ({"network_dim": "many"}, "network_dim"),
])
def test_a_bad_option_is_422_naming_the_field(client, dataset, body, field):
    for path in ("/runs", "/queue"):
        answer = call(client, "POST", path, json=job(dataset, "bad") | body)
        assert answer.status_code == 422 and answer.json()["field"] == field and answer.json()["error"].startswith(f"{field}: ")
    unknown = call(client, "POST", "/runs", json=job(dataset, "bad", epochs=3)).json()
    assert unknown["field"] == "epochs" and unknown["error"].startswith("unknown option(s) epochs")
    assert call(client, "GET", "/queue").json()["jobs"] == [] and call(client, "GET", "/progress").json()["name"] != "bad"


def test_a_body_that_is_not_an_object_is_422(client):
    answer = call(client, "POST", "/runs", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["field"] is None and "JSON object" in answer.json()["error"]
    assert call(client, "POST", "/queue/nobody/move", json={"offset": "up"}).json()["field"] == "offset"


def test_every_route_wants_the_credentials(client):
    routes = [("GET", "/progress"), ("GET", "/progress/sample"), ("POST", "/runs"), ("GET", "/runs"), ("POST", "/runs/x/resume"),
              ("POST", "/interrupt"), ("GET", "/outputs"), ("GET", "/queue"), ("POST", "/queue"), ("DELETE", "/queue/x"),
              ("POST", "/queue/x/move"), ("POST", "/queue/resume")]
    for method, path in routes:
        refused = client.request(method, PREFIX + path)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Basic", path
        assert client.request(method, PREFIX + path, auth=(AUTH[0], "wrong")).status_code == 401
    assert client.get(PREFIX + "/progress", auth=AUTH).status_code == 200
    assert client.get(PREFIX + "/progress", auth=("other", "pw")).status_code == 200


def test_without_credentials_the_routes_are_open(served):
    app = FastAPI()
    add_api_routes(app, served[1])
    assert TestClient(app).get(PREFIX + "/queue").status_code == 200


def test_interrupt_then_resume_reaches_the_end(client, dataset):
    call(client, "POST", "/runs", json=job(dataset, "api2", train_batch_size=1, max_train_epochs=5))  # 20 steps
    wait_until(lambda: call(client, "GET", "/progress").json()["step"] >= 1, every=0.02)
    assert call(client, "POST", "/interrupt").json()["message"].startswith("interrupt requested")
    stopped = settled(client)
    assert stopped["status"] == "interrupted" and 1 <= stopped["step"] < 20
    assert stopped["final_path"].endswith(f"api2-step{stopped['step']:08d}.safetensors")
    runs = {r["name"]: r for r in call(client, "GET", "/runs").json()["runs"]}
    assert runs["api2"]["status"] == "interrupted" and runs["api2"]["step"] == stopped["step"]
    assert call(client, "POST", "/runs/nothing/resume").status_code == 404
    assert call(client, "POST", "/runs/..%2F..%2Fetc/resume").status_code == 404

    resumed = call(client, "POST", "/runs/api2/resume")
    assert resumed.status_code == 202 and resumed.json()["name"] == "api2"
    assert call(client, "POST", "/runs", json=job(dataset, "api3")).status_code == 409  # one run at a time
    done = settled(client)
    assert done["status"] == "finished" and done["step"] == 20 and done["final_path"].endswith("api2.safetensors")
    assert {r["name"]: r["status"] for r in call(client, "GET", "/runs").json()["runs"]}["api2"] == "finished"


def test_queued_jobs_run_one_after_the_other_in_order(client, served, dataset):
    host = served[2]
    (host.lora_dir / "taken.safetensors").write_bytes(b"x")
    (host.runs_dir / "old").mkdir(parents=True)
    (host.runs_dir / "old" / "config.toml").write_text("")
    first = call(client, "POST", "/queue", json=job(dataset, "q1", train_batch_size=1, max_train_epochs=4))  # 16 steps: time to edit the queue
    assert first.status_code == 201 and first.json()["started"] is True
    for name in ("q2", "q3", "q4"):
        added = call(client, "POST", "/queue", json=job(dataset, name))
        assert added.status_code == 201 and added.json()["started"] is False
    assert [j["name"] for j in call(client, "GET", "/queue").json()["jobs"]] == ["q2", "q3", "q4"]
    refused = {name: call(client, "POST", "/queue", json=job(dataset, name)).json() for name in ("q1", "q3", "taken", "old")}
    assert all(answer["field"] == "output_name" for answer in refused.values())
    assert "'q1' is the name of the run in progress" in refused["q1"]["error"]
    assert "'q3' is already queued" in refused["q3"]["error"]
    assert str(host.lora_dir / "taken.safetensors") in refused["taken"]["error"]
    assert "'old' has a run folder" in refused["old"]["error"]

    moved = call(client, "POST", "/queue/q4/move", json={"offset": -2}).json()
    assert [j["name"] for j in moved["jobs"]] == ["q4", "q2", "q3"] and moved["message"] == "q4 is now job 1 of 3"
    assert [j["name"] for j in call(client, "DELETE", "/queue/q3").json()["jobs"]] == ["q4", "q2"]
    assert call(client, "DELETE", "/queue/q3").status_code == 404
    assert call(client, "GET", "/progress").json()["name"] == "q1"  # still the first job: the edits raced nothing

    settled(client)
    ended = [e for e in call(client, "GET", "/queue").json()["ended"] if e["name"] in ("q1", "q2", "q4")]
    assert [(e["name"], e["status"]) for e in ended] == [("q1", "finished"), ("q4", "finished"), ("q2", "finished")]
    assert all(a["finished_at"] <= b["started_at"] for a, b in zip(ended, ended[1:]))
    outputs = {o["name"] for o in call(client, "GET", "/outputs").json()["outputs"]}
    assert {"q1", "q2", "q4"} <= outputs and "q3" not in outputs


def test_the_queue_survives_a_restart_held_until_resumed(served, dataset, tmp_path):
    host = served[2]
    settings = TabSettings(lora_dir=host.lora_dir, runs_dir=tmp_path / "runs")
    before = TabController(host, settings)
    with before.use_model("a comparison grid"):  # the first job waits for the model, and is interrupted there
        assert before.enqueue(config_from_json(job(dataset, "r1"))).name == "r1"
        before.enqueue(config_from_json(job(dataset, "r2")))
        assert before.snapshot().status == "starting" and [j.name for j in before.queued()] == ["r2"]
        before.interrupt()
        before.job.wait(30)
    assert before.snapshot().status == "interrupted" and before.queue_view().held
    assert sorted(p.name for p in (tmp_path / "runs" / "queue").iterdir()) == ["0001-r1.toml", "0002-r2.toml"]

    after = TabController(host, settings)  # a restart: a new controller over the same runs folder
    app = FastAPI()
    add_api_routes(app, after)
    client = TestClient(app)
    queue = client.get(PREFIX + "/queue").json()
    assert queue["held"] is True and [j["name"] for j in queue["jobs"]] == ["r1", "r2"]
    assert queue["jobs"][0]["config"]["max_train_epochs"] == 2 and queue["jobs"][0]["file"].endswith("0001-r1.toml")
    assert client.get(PREFIX + "/progress").json()["status"] == "idle"  # nothing trains unasked
    assert client.post(PREFIX + "/queue/resume").json()["message"].startswith("the queue goes on: r1 is training")
    wait_until(lambda: not after.busy())
    assert [(s.name, s.status) for s in after.history] == [("r1", "finished"), ("r2", "finished")]
    assert not list((tmp_path / "runs" / "queue").iterdir())
