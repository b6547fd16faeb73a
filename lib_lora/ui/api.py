"""The HTTP API under /train-lora/v1/, on the webui's FastAPI app and the standalone app's (no Gradio here).

Every route goes through the tab's `TabController` (its job, queue and model lock), so the API and the
tab see the same run and the same queue. Bodies and answers are JSON with TrainConfig's field names.
Errors are JSON too: a bad or taken option is 422 `{"error": ..., "field": ...}` (the ConfigError's
message, which starts with the field it names), a run already in progress 409, an unknown job or run
404. With credentials (the webui's `--api-auth user:pass[,user2:pass2]`), every route asks for HTTP
Basic, checked as the webui's own API does (modules/api/api.py, `Api.auth`).

    GET    /progress                the current (or last) run: status, step, loss, lr, ETA, latest sample, saves
    GET    /progress/sample         the latest sample image (PNG)
    POST   /runs                    start a run from a config                 -> 202, the run's progress
    GET    /runs                    run folders with their status
    POST   /runs/{name}/resume      resume a run folder                       -> 202
    POST   /interrupt               save and stop at the next step (holds the queue)
    GET    /outputs                 LoRA files in the Lora folder
    GET    /queue                   waiting jobs in order, whether held, how this session's runs ended
    POST   /queue                   add a job from a config                   -> 201
    DELETE /queue/{name}            remove a waiting job
    POST   /queue/{name}/move       {"offset": -1} moves it one place earlier, 1 later
    POST   /queue/resume            release the hold; the next job starts if nothing trains
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from secrets import compare_digest

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool

from ..train.config import ConfigError, TrainConfig
from .controller import BusyError, TabController
from .queue import NotFoundError, QueuedJob, QueueView, RunInfo
from .runner import JobState

PREFIX = "/train-lora/v1"
FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def parse_api_auth(text: str | None) -> dict[str, str]:
    """The webui's `--api-auth` value, "user:pass[,user2:pass2]", as {user: password} (empty: no auth)."""
    credentials = {}
    for pair in (text or "").split(","):
        if pair.strip():
            user, colon, password = pair.partition(":")
            if not colon or not user:
                raise ValueError(f"--api-auth: {pair!r} is not user:password")
            credentials[user] = password
    return credentials


def _basic_auth(credentials: Mapping[str, str]) -> Callable:
    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password.encode(), expected.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
    return check


def error_field(message: str) -> str | None:
    """The TrainConfig field a ConfigError names: its first word ("resolution: 100 is not ..."), or the first unknown option."""
    unknown = re.match(r"unknown option\(s\) (\w+)", message)
    if unknown:
        return unknown[1]
    first = re.match(r"\w+", message)
    return first[0] if first and first[0] in FIELDS else None


def config_from_json(body, defaults: Mapping[str, object] | None = None) -> TrainConfig:
    """A JSON object of TrainConfig options over `defaults` (the tab's first values: the host's) -> a validated
    config, checked as the tab's; "resolution" may be 512, "512x768" or [512, 768]."""
    if not isinstance(body, dict):
        raise ConfigError("the body must be a JSON object of training options by TrainConfig name (train_data_dir, output_name, ...)")
    values = dict(body)
    if isinstance(values.get("resolution"), int):
        values["resolution"] = [values["resolution"]]
    return TrainConfig.from_dict({**(defaults or {}), **values})


# ---- answers


def progress_json(state: JobState, now: float | None = None) -> dict:
    sample = state.samples[-1] if state.samples else None
    return {
        "status": state.status, "name": state.name, "step": state.step, "total_steps": state.total_steps, "epoch": state.epoch,
        "loss": state.losses[-1][1] if state.losses else None, "avg_loss": state.avg_loss, "lr": state.lr, "it_per_s": state.it_per_s,
        "elapsed_s": round(state.elapsed(now), 1), "eta_s": None if state.eta(now) is None else round(state.eta(now), 1),
        "latest_sample": str(sample) if sample else None, "latest_sample_url": f"{PREFIX}/progress/sample" if sample else None,
        "saves": [str(p) for p in state.saves], "error": state.error, "plan": state.plan,
        "run_dir": str(state.result.run_dir) if state.result else None,
        "final_path": str(state.result.final_path) if state.result and state.result.final_path else None,
    }


def ended_json(state: JobState) -> dict:
    return {"name": state.name, "status": state.status, "step": state.step, "total_steps": state.total_steps, "error": state.error,
            "final_path": str(state.result.final_path) if state.result and state.result.final_path else None,
            "started_at": state.started_at, "finished_at": state.finished_at}


def queued_json(job: QueuedJob, position: int) -> dict:
    return {"position": position, "name": job.name, "file": str(job.path), "config": job.config.to_dict()}


def queue_json(view: QueueView) -> dict:
    return {"held": view.held, "jobs": [queued_json(job, i) for i, job in enumerate(view.jobs, 1)],
            "ended": [ended_json(state) for state in view.done], "problems": view.problems}


def run_json(run: RunInfo) -> dict:
    return {"name": run.name, "path": str(run.path), "status": run.status, "step": run.step,
            "final_path": str(run.final_path) if run.final_path else None}


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _answer(fn: Callable[[], dict], status: int = 200) -> JSONResponse:
    """`fn()` as JSON, or the error it raised as a JSON error."""
    try:
        return JSONResponse(fn(), status_code=status)
    except ConfigError as e:
        return _error(422, str(e), field=error_field(str(e)))
    except NotFoundError as e:
        return _error(404, str(e))
    except BusyError as e:
        return _error(409, str(e))


async def _body(request: Request):
    try:
        return await request.json()
    except ValueError:
        return None  # config_from_json says what was expected


# ---- routes


def add_api_routes(app: FastAPI, controller: TabController, *, credentials: Mapping[str, str] | None = None) -> None:
    """The routes on `app` (the webui's `on_app_started` app, or the standalone server's), all through `controller`."""
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(_basic_auth(dict(credentials)))] if credentials else [])
    c = controller

    @router.get("/progress")
    def progress():
        return progress_json(c.snapshot())

    @router.get("/progress/sample")
    def latest_sample():
        samples = c.snapshot().samples
        if not samples:
            return _error(404, "no sample image yet: set sample_prompts and sample_every_n_epochs or _steps")
        return Response(samples[-1].read_bytes(), media_type="image/png")

    @router.post("/runs")
    async def start(request: Request):
        body = await _body(request)
        return await run_in_threadpool(_answer, lambda: progress_json(c.start_run(config_from_json(body, c.settings.defaults)).snapshot()), 202)

    @router.get("/runs")
    def runs():
        return _answer(lambda: {"runs": [run_json(run) for run in c.runs()]})

    @router.post("/runs/{name}/resume")
    def resume(name: str):
        return _answer(lambda: progress_json(c.resume_run(name).snapshot()), 202)

    @router.post("/interrupt")
    def interrupt():
        return {"message": c.interrupt(), "progress": progress_json(c.snapshot())}

    @router.get("/outputs")
    def outputs():
        files = c.outputs()
        return {"folder": str(c.lora_dir()), "outputs": [{"name": name, "path": str(path), "bytes": path.stat().st_size,
                                                          "modified": path.stat().st_mtime} for name, path in sorted(files.items())]}

    add_queue_routes(router, c)
    app.include_router(router)


def add_queue_routes(router: APIRouter, c: TabController) -> None:
    @router.get("/queue")
    def queue():
        return _answer(lambda: queue_json(c.queue_view()))

    @router.post("/queue")
    async def add(request: Request):
        body = await _body(request)

        def enqueue() -> dict:
            job = c.enqueue(config_from_json(body, c.settings.defaults))
            view = c.queue_view()
            position = next((i for i, queued in enumerate(view.jobs, 1) if queued.name == job.name), None)
            return {"name": job.name, "started": position is None, "position": position, "queue": queue_json(view)}
        return await run_in_threadpool(_answer, enqueue, 201)

    @router.delete("/queue/{name}")
    def remove(name: str):
        return _answer(lambda: {"message": c.remove_queued(name), **queue_json(c.queue_view())})

    @router.post("/queue/{name}/move")
    async def move(name: str, request: Request):
        body = await _body(request)
        offset = body.get("offset") if isinstance(body, dict) else None
        if not isinstance(offset, int) or isinstance(offset, bool):
            return _error(422, 'offset: give {"offset": -1} to move the job one place earlier, 1 to move it later', field="offset")
        return await run_in_threadpool(_answer, lambda: {"message": c.move_queued(name, offset), **queue_json(c.queue_view())})

    @router.post("/queue/resume")
    def resume_queue():
        return _answer(lambda: {"message": c.resume_queue(), **queue_json(c.queue_view())})
