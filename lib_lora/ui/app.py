"""The standalone app: the Train LoRA tab plus a small txt2img panel, on one checkpoint.

`python -m lib_lora ui` (see `cli.py`). The txt2img panel resolves `<lora:name:w>` tags (several
blend) in the host's Lora folder through `generate_with_loras`; it takes turns with training
through the controller's model lock. The HTTP API (`api.py`, /train-lora/v1/) is added to the
server's FastAPI app with the tab's controller. Binds to 127.0.0.1 unless told otherwise, and warns
when bound to an address other machines can reach.
"""

import os
import sys
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; must precede the import

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from ..hosts.standalone import StandaloneHost  # noqa: E402
from ..models.pipeline import GenerationParams  # noqa: E402
from ..models.samplers import SAMPLERS  # noqa: E402
from ..networks.apply import find_lora_files, generate_with_loras  # noqa: E402
from ..train.presets import DEMO  # noqa: E402
from .api import PREFIX, add_api_routes, parse_api_auth  # noqa: E402
from .controller import TabController  # noqa: E402
from .settings import TabSettings  # noqa: E402
from .tab import GRADIO_MAJOR, USER_ERRORS, TrainTab, create_tab, note  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]  # the extension root: javascript/ and style.css
HISTORY = 8
LOOPBACK = ("127.", "::1", "localhost")


@dataclass(frozen=True)
class AppOptions:
    out_dir: Path
    embedded: bool  # the embedded 64 px model: its preset and size are the defaults
    dataset_roots: tuple[Path, ...] = ()  # --dataset-root: the only folders datasets are read from (empty: any)


def assets() -> tuple[str, str]:
    """(css, js) from the extension root, as the webui would load them; empty if missing."""
    css = ROOT / "style.css"
    scripts = sorted((ROOT / "javascript").glob("*.js"))
    return (css.read_text(encoding="utf-8") if css.is_file() else "", "\n".join(p.read_text(encoding="utf-8") for p in scripts))


def lora_names(host: StandaloneHost) -> str:
    names = sorted(find_lora_files([host.lora_dir])) if Path(host.lora_dir).is_dir() else []
    return note(f"LoRAs in {host.lora_dir}: " + (", ".join(names) if names else "none yet") + ". Use <lora:name:weight> in the prompt; several blend.")


def checkpoint_dirs(host: StandaloneHost, out_dir: Path) -> tuple[Path, ...]:
    """`<out>/checkpoints` (bake writes there; made now) and the loaded checkpoint's folder: the Tools' checkpoint pickers."""
    baked = Path(out_dir) / "checkpoints"
    baked.mkdir(parents=True, exist_ok=True)
    return (baked, host.checkpoint_path.parent) if host.checkpoint_path else (baked,)


def build_app(host: StandaloneHost, options: AppOptions) -> gr.Blocks:
    return create_app(host, options)[0]


def create_app(host: StandaloneHost, options: AppOptions) -> tuple[gr.Blocks, TabController]:
    """The app's Blocks and the tab's controller (which the HTTP API is given)."""
    Path(host.lora_dir).mkdir(parents=True, exist_ok=True)
    settings = TabSettings(presets_dir=options.out_dir / "presets", defaults=DEMO if options.embedded else {}, lora_dir=Path(host.lora_dir),
                           runs_dir=Path(host.runs_dir), checkpoint_dirs=checkpoint_dirs(host, options.out_dir),
                           dataset_roots=options.dataset_roots)
    tab_blocks, controller, tab = create_tab(host, settings)
    css, js = assets()
    extra = {"head": f"<script>{js}</script>"} if GRADIO_MAJOR >= 4 and js else {}
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
    with gr.Blocks(title="Train LoRA", css=css, theme=theme, analytics_enabled=False, **extra) as app:
        gr.HTML(f'<div class="train-lora-header"><b>Train LoRA</b> &middot; model {escape(host.model_name)} on {escape(str(host.device))}'
                f' &middot; LoRAs: {escape(str(host.lora_dir))} &middot; runs: {escape(str(host.runs_dir))}</div>')
        with gr.Tabs():
            with gr.Tab("Train LoRA", elem_id="tab_train_lora"):
                tab_blocks.render()
            with gr.Tab("txt2img", elem_id="tab_lora_txt2img"):
                build_txt2img(host, tab, 64 if options.embedded else 512)
        if GRADIO_MAJOR < 4 and js:
            app.load(None, None, None, _js=f"() => {{ {js} }}")
    return app, controller


def build_txt2img(host: StandaloneHost, tab: TrainTab, size: int) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a zkz star <lora:my_lora:0.8>", elem_id="lora_app_prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="lora_app_negative")
            with gr.Row():
                steps = gr.Number(label="Steps", value=20, precision=0, elem_id="lora_app_steps")
                cfg = gr.Number(label="CFG scale", value=7.0, elem_id="lora_app_cfg")
                seed = gr.Number(label="Seed", value=1, precision=0, elem_id="lora_app_seed")
            with gr.Row():
                width = gr.Number(label="Width", value=size, precision=0, elem_id="lora_app_width")
                height = gr.Number(label="Height", value=size, precision=0, elem_id="lora_app_height")
                sampler = gr.Dropdown(choices=list(SAMPLERS), value=SAMPLERS[0], label="Sampler", elem_id="lora_app_sampler")
            loras = gr.HTML(lora_names(host), elem_id="lora_app_loras")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="lora_app_generate")
                refresh = gr.Button("List LoRAs", elem_id="lora_app_refresh")
        with gr.Column(scale=2):
            image = gr.Image(label="Result", type="pil", interactive=False, height=320, elem_id="lora_app_image")
            info = gr.HTML(elem_id="lora_app_info")
            history = gr.Gallery(label="Recent", columns=4, height=220, object_fit="contain", elem_id="lora_app_history")
    past, made = gr.State([]), gr.State(0)

    def run(prompt, negative, steps, cfg, seed, width, height, sampler, past, made, progress=gr.Progress()):
        params = GenerationParams(prompt=prompt or "", negative_prompt=negative or "", steps=int(steps or 20), cfg_scale=float(cfg or 7),
                                  seed=int(seed or 0), width=int(width or size), height=int(height or size), sampler=sampler or SAMPLERS[0])
        started = time.perf_counter()
        try:
            with tab.c.use_model("txt2img"):
                result = generate_with_loras(host.ckpt, params, [host.lora_dir], callback=lambda i, n: progress((i + 1, n), desc="sampling"))[0]
        except USER_ERRORS as e:
            return gr.update(), note(str(e), "error"), gr.update(), past, made, lora_names(host)
        past = ([(result, prompt)] + list(past))[:HISTORY]
        message = f"#{made + 1} seed {params.seed}, {params.steps} steps, {params.width}x{params.height}, {time.perf_counter() - started:.1f} s: {prompt}"
        return result, note(message), past, past, made + 1, lora_names(host)

    generate.click(run, [prompt, negative, steps, cfg, seed, width, height, sampler, past, made], [image, info, history, past, made, loras])
    refresh.click(lambda: lora_names(host), None, [loras], queue=False)


def queue_kwargs() -> dict:
    """Several listeners at once (progress polling beside txt2img); the name changed in Gradio 4."""
    return {"default_concurrency_limit": 4} if GRADIO_MAJOR >= 4 else {"concurrency_count": 4}


def serve(blocks: gr.Blocks, controller: TabController, *, port: int, bind: str = "127.0.0.1", api_auth: str | None = None) -> FastAPI:
    """Start the server without blocking and add the HTTP API to it; returns Gradio's FastAPI app (3.41 and 4.x
    both return it from `launch`). `api_auth`: "user:pass[,user2:pass2]", HTTP Basic on the API's routes."""
    credentials = parse_api_auth(api_auth)  # a malformed value stops before the server starts
    server, _, _ = blocks.queue(**queue_kwargs()).launch(server_name=bind, server_port=port, show_api=False, inbrowser=False,
                                                          prevent_thread_lock=True)
    add_api_routes(server, controller, credentials=credentials)
    return server


def exposure_warning(bind: str, api_auth: str | None, dataset_roots: tuple[Path, ...]) -> str | None:
    """What serving on `bind` opens to other machines, or None on a loopback address (this machine only)."""
    if bind.startswith(LOOPBACK):
        return None
    missing = ([] if api_auth else ["--api-auth USER:PASS for the HTTP API"]) + ([] if dataset_roots else ["--dataset-root FOLDER"])
    advice = f"; set {' and '.join(missing)}" if missing else ""
    return (f"warning: serving on {bind}: anyone who can reach this machine can use the tab (train, read datasets "
            f"{'under ' + ', '.join(map(str, dataset_roots)) if dataset_roots else 'in any folder this user can read'}, "
            f"write LoRAs){advice}; Gradio's page itself has no password")


def launch_app(checkpoint: Path | None, out_dir: Path, port: int, bind: str = "127.0.0.1", api_auth: str | None = None,
               dataset_roots: tuple[Path, ...] = ()) -> None:
    warning = exposure_warning(bind, api_auth, dataset_roots)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"loading {checkpoint or 'the embedded tiny model'} ...", flush=True)
    host = StandaloneHost.from_file(checkpoint, out_dir=out_dir)
    blocks, controller = create_app(host, AppOptions(Path(out_dir), embedded=checkpoint is None, dataset_roots=dataset_roots))
    serve(blocks, controller, port=port, bind=bind, api_auth=api_auth)
    print(f"HTTP API: http://{bind}:{port}{PREFIX}/" + (" (HTTP Basic, --api-auth)" if api_auth else ""), flush=True)
    blocks.block_thread()
