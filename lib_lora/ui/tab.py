"""The "Train LoRA" tab: one `gr.Blocks` for the webui and the standalone app.

Only layout and wiring live here; what the buttons do is `TabController` (plain, tested without
Gradio). Uses only what Gradio 3.41 (A1111) and 4.x (Forge) both have: no `_js`/`js`, no `.style()`,
no `every=`/`gr.Timer` (progress is a generator attached to Train/Resume/Refresh), `gr.update`,
PIL images for outputs, and event kwargs present in both.
"""

import time
from collections.abc import Callable
from html import escape

import gradio as gr

from ..data.errors import DatasetError
from ..train.config import ConfigError
from . import fields
from .chart import loss_chart_svg
from .controller import BusyError, TabController
from .prepare import CROP_MODES
from .settings import TabSettings
from .status import log_text, progress_html, queue_html, repeats_html, summary_html
from .tags import CAPTION_MODES

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
USER_ERRORS = (ConfigError, DatasetError, BusyError, ValueError, OSError)
SAMPLES_SHOWN = 8
NO_CAPTIONER = ("Captioning uses the webui's interrogators (BLIP, deepbooru); this host offers none, "
                "so write captions yourself or caption inside the webui.")


def listener_kwargs() -> dict:
    """Gradio 4 runs each listener one call at a time; progress polling must not wait for another tab."""
    return {"concurrency_limit": None} if GRADIO_MAJOR >= 4 else {}


def note(text: str, kind: str = "info") -> str:
    return f'<div class="train-lora-note train-lora-{kind}">{escape(text)}</div>' if text else ""


def reporting(fn: Callable, failure: Callable[[str], tuple | str]) -> Callable:
    """Run `fn`; a user error (bad option, missing folder, busy model) becomes `failure(message)`."""
    def wrapped(*args):
        try:
            return fn(*args)
        except USER_ERRORS as e:
            return failure(str(e))
    return wrapped


class TrainTab:
    """Builds the widgets (`self.widgets`: TrainConfig field -> component) and wires them."""

    def __init__(self, controller: TabController):
        self.c = controller
        self.s: TabSettings = controller.settings
        self.specs = fields.field_specs()
        self.layout = fields.layout()
        self.initial = controller.initial_values()
        self.initial_summary = controller.summary(self.initial)
        self.widgets: dict[str, gr.components.Component] = {}

    def id(self, name: str) -> str:
        return f"{self.s.elem_prefix}_{name}"

    # --- widgets from TrainConfig
    def widget(self, name: str):
        spec, value = self.specs[name], self.initial[name]
        common = dict(label=spec.label, info=spec.info, elem_id=self.id(name))
        if spec.kind == "checkbox":
            return gr.Checkbox(value=value, **common)
        if spec.kind == "dropdown":
            return gr.Dropdown(choices=list(spec.choices), value=value, **common)
        if spec.kind in ("int", "float"):
            return gr.Number(value=value, precision=0 if spec.kind == "int" else None, **common)
        return gr.Textbox(value=value, lines=3 if spec.kind == "lines" else 1, **common)

    def group(self, title: str, names: tuple[str, ...], per_row: int = 3):
        with gr.Accordion(title, open=title in fields.OPEN_GROUPS, elem_id=self.id("group_" + title.lower().replace(" ", "_"))):
            for start in range(0, len(names), per_row):
                with gr.Row():
                    for name in names[start:start + per_row]:
                        self.widgets[name] = self.widget(name)

    def section(self, section: str, per_row: int = 3):
        for title, names in self.layout[section].items():
            self.group(title, names, per_row)

    @property
    def names(self) -> list[str]:
        return list(self.widgets)

    @property
    def inputs(self) -> list:
        return list(self.widgets.values())

    def values(self, args) -> dict:
        return dict(zip(self.names, args))

    @property
    def watched(self) -> list:
        """What `poll` yields to, in its order."""
        return [self.progress, self.chart, self.samples, self.log, self.queue_view]

    # --- layout
    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False) as self.blocks:
            with gr.Row(elem_id=self.id("main")):
                with gr.Column(scale=3, elem_id=self.id("options")):
                    self.build_presets()
                    with gr.Tabs(elem_id=self.id("sections")):
                        with gr.Tab("Dataset", elem_id=self.id("tab_dataset")):
                            self.build_dataset()
                        with gr.Tab("Prepare", elem_id=self.id("tab_prepare")):
                            self.build_prepare()
                        with gr.Tab("Network", elem_id=self.id("tab_network")):
                            self.section("Network")
                        with gr.Tab("Training", elem_id=self.id("tab_training")):
                            self.repeats = gr.HTML(repeats_html(self.initial_summary), elem_id=self.id("repeats"))
                            self.section("Training")
                        with gr.Tab("Tools", elem_id=self.id("tab_tools")) as self.tools_tab:
                            self.build_tools()
                with gr.Column(scale=2, elem_id=self.id("run")):
                    self.build_run()
                    self.build_after()
            self.wire()
        return self.blocks

    def build_presets(self):
        with gr.Row(elem_id=self.id("presets")):
            self.preset = gr.Dropdown(choices=self.c.preset_names(), value=None, label="Preset", elem_id=self.id("preset"), scale=4)
            self.preset_load = gr.Button("Load preset", elem_id=self.id("preset_load"), scale=1)
        with gr.Accordion("Save the options as a preset", open=False, visible=self.s.presets_dir is not None, elem_id=self.id("preset_saving")):
            with gr.Row():
                self.preset_name = gr.Textbox(label="Preset name", placeholder="my preset", elem_id=self.id("preset_name"), scale=3)
                self.preset_replace = gr.Checkbox(label="replace", value=False, elem_id=self.id("preset_replace"), scale=1)
                self.preset_save = gr.Button("Save preset", elem_id=self.id("preset_save"), scale=1)
        self.preset_note = gr.HTML(elem_id=self.id("preset_note"))

    def build_dataset(self):
        self.group("Folders", self.layout["Dataset"]["Folders"], per_row=2)
        self.scan = gr.Button("Scan dataset", variant="secondary", elem_id=self.id("scan"))
        self.report = gr.HTML(elem_id=self.id("report"))
        self.thumbs = gr.Gallery(label="First images", columns=8, height=140, object_fit="contain", elem_id=self.id("thumbs"))
        for title in ("Captions", "Images"):
            self.group(title, self.layout["Dataset"][title])

    def build_prepare(self):
        with gr.Accordion("Resize and crop into a new folder", open=True):
            with gr.Row():
                self.prep_source = gr.Textbox(label="Source folder", placeholder="(the dataset folder)", elem_id=self.id("prep_source"))
                self.prep_dest = gr.Textbox(label="New folder", placeholder="/path/to/new_dataset", elem_id=self.id("prep_dest"))
            with gr.Row():
                self.prep_size = gr.Textbox(label="Size", value="512", info="512 or 512x768", elem_id=self.id("prep_size"))
                self.prep_mode = gr.Radio(choices=list(CROP_MODES), value="center", label="Crop", info="focus: around the detail", elem_id=self.id("prep_mode"))
                self.prep_use = gr.Checkbox(label="Use the new folder as dataset", value=True, elem_id=self.id("prep_use"))
            self.prep_run = gr.Button("Resize and crop", elem_id=self.id("prep_run"))
            self.prep_note = gr.HTML()
        with gr.Accordion("Edit tags in the caption files", open=True):
            with gr.Row():
                self.tag_remove = gr.Textbox(label="Remove tags", placeholder="simple background, white background", elem_id=self.id("tag_remove"))
                self.tag_add = gr.Textbox(label="Add tags", placeholder="zkz", elem_id=self.id("tag_add"))
            with gr.Row():
                self.tag_replace = gr.Textbox(label="Replace", placeholder="blue hair => aqua hair", lines=2, elem_id=self.id("tag_replace"))
                with gr.Column():
                    self.tag_front = gr.Checkbox(label="Add at the start", value=True, elem_id=self.id("tag_front"))
                    self.tag_min = gr.Number(label="Drop tags in fewer images than", value=0, precision=0, elem_id=self.id("tag_min"))
            with gr.Row():
                self.tag_preview = gr.Button("Preview", elem_id=self.id("tag_preview"))
                self.tag_apply = gr.Button("Apply to the files", variant="primary", elem_id=self.id("tag_apply"))
            self.tag_table = gr.HTML(elem_id=self.id("tag_table"))
        with gr.Accordion("Caption images", open=False):
            names = list(self.s.captioners)
            self.cap_model = gr.Dropdown(choices=names, value=names[0] if names else None, label="Interrogator", interactive=bool(names))
            self.cap_mode = gr.Radio(choices=list(CAPTION_MODES), value=CAPTION_MODES[0], label="Existing captions", interactive=bool(names))
            self.cap_run = gr.Button("Caption", interactive=bool(names), elem_id=self.id("caption"))
            self.cap_note = gr.HTML(note("" if names else NO_CAPTIONER))

    def build_tools(self):
        from .toolbox import Toolbox
        from .tools_tab import ToolsPanel

        self.tools = ToolsPanel(Toolbox(self.c), self.id)
        self.tools.build()

    def build_run(self):
        self.summary = gr.HTML(summary_html(self.initial_summary), elem_id=self.id("summary"))
        with gr.Row():
            self.train = gr.Button("Train", variant="primary", elem_id=self.id("train"))
            self.queue_add = gr.Button("Add to queue", elem_id=self.id("queue_add"))
            self.stop = gr.Button("Interrupt", variant="stop", elem_id=self.id("stop"))
            self.resume = gr.Button("Resume", elem_id=self.id("resume"))
            self.refresh = gr.Button("Refresh", elem_id=self.id("refresh"))
        self.run_note = gr.HTML(elem_id=self.id("run_note"))
        self.run_dir = gr.Textbox(label="Run folder to resume", placeholder="(the last run)", elem_id=self.id("run_dir"))
        self.progress = gr.HTML(progress_html(self.c.snapshot()), elem_id=self.id("progress"))
        self.build_queue()
        self.chart = gr.HTML(loss_chart_svg([]), elem_id=self.id("chart"))
        self.samples = gr.Gallery(label="Latest samples", columns=4, height=200, object_fit="contain", elem_id=self.id("samples"))
        self.log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False, elem_id=self.id("log"))

    def build_queue(self):
        view = self.c.queue_view(ask=False)  # the webui's model may still be loading: no host for this
        with gr.Accordion("Queue", open=True, elem_id=self.id("queue_group")):
            self.queue_note = gr.HTML(elem_id=self.id("queue_note"))
            self.queue_view = gr.HTML(queue_html(view), elem_id=self.id("queue"))
            self.queue_job = gr.Dropdown(choices=[j.name for j in view.jobs], value=None, label="Queued job", allow_custom_value=True,
                                         elem_id=self.id("queue_job"))
            with gr.Row():
                self.queue_up = gr.Button("Up", size="sm", elem_id=self.id("queue_up"))
                self.queue_down = gr.Button("Down", size="sm", elem_id=self.id("queue_down"))
                self.queue_remove = gr.Button("Remove", size="sm", elem_id=self.id("queue_remove"))
                self.queue_run = gr.Button("Run queue", size="sm", elem_id=self.id("queue_run"))

    def build_after(self):
        with gr.Accordion("Compare epochs and keep one", open=False, elem_id=self.id("after")):
            with gr.Row():
                self.cmp_prompt = gr.Textbox(label="Prompt", placeholder="trigger words and a scene", elem_id=self.id("cmp_prompt"), scale=3)
                self.cmp_weights = gr.Textbox(label="Weights", value="0.4, 0.7, 1.0", elem_id=self.id("cmp_weights"), scale=1)
            with gr.Row():
                self.cmp_seed = gr.Number(label="Seed", value=1, precision=0)
                self.cmp_steps = gr.Number(label="Steps", value=20, precision=0)
                self.cmp_cfg = gr.Number(label="CFG scale", value=7.0)
            self.cmp_run = gr.Button("Compare saved files", elem_id=self.id("cmp_run"))
            self.cmp_grid = gr.Image(label="Epoch x weight", type="pil", interactive=False, elem_id=self.id("cmp_grid"))
            with gr.Row():
                self.keep_file = gr.Dropdown(choices=[], label="Saved file", elem_id=self.id("keep_file"), scale=2)
                self.keep_list = gr.Button("List files", size="sm", scale=1)
                self.keep_name = gr.Textbox(label="Keep as (file name)", placeholder="(the output name)", elem_id=self.id("keep_name"), scale=2)
            with gr.Row():
                self.keep_replace = gr.Checkbox(label="Replace the existing file of that name", value=False, elem_id=self.id("keep_replace"))
                self.keep_delete = gr.Checkbox(label="Delete the epoch files afterwards", value=False, elem_id=self.id("keep_delete"))
            self.keep_run = gr.Button("Keep this file", elem_id=self.id("keep_run"))
            self.keep_note = gr.HTML()

    # --- wiring
    def wire(self):
        from .wiring import wire

        wire(self)


def create_tab(host, settings: TabSettings | None = None) -> tuple[gr.Blocks, TabController, TrainTab]:
    """The tab, its controller and widget holder (the standalone app adds its txt2img panel with them).
    `host` may be a TabController already made (the webui gives its HTTP API the same one)."""
    controller = host if isinstance(host, TabController) else TabController(host, settings)
    tab = TrainTab(controller)
    return tab.build(), controller, tab


def build_tab(host, settings: TabSettings | None = None) -> gr.Blocks:
    """The Train LoRA tab. `host`: a Host, a zero-argument factory called when the model is needed, or a TabController."""
    return create_tab(host, settings)[0]


def poll(tab: TrainTab):
    """Generator for the run panel (`tab.watched`): yields until no run is active and no queued job is about
    to start (one yield when idle), so it follows the queue from one job to the next."""
    shown_samples, version, shown_queue, job = -1, -1, None, None
    while True:
        busy = tab.c.busy()  # before the snapshot: the last yield shows the state after the last run
        state = tab.c.snapshot()
        if tab.c.job is not job:  # the queue's next job: its own samples and chart
            job, shown_samples, version = tab.c.job, -1, -1
        samples = gr.update()
        if len(state.samples) != shown_samples:
            shown_samples = len(state.samples)
            samples = sample_images(state.samples)
        chart = loss_chart_svg(state.losses, state.total_steps, state.validation) if state.version != version else gr.update()
        version = state.version
        queue = queue_html(tab.c.queue_view(ask=False))
        yield progress_html(state), chart, samples, log_text(state), (queue if queue != shown_queue else gr.update())
        shown_queue = queue
        if not busy:
            return
        time.sleep(tab.s.poll_seconds)


def sample_images(paths) -> list:
    from PIL import Image

    shown = []
    for path in list(paths)[-SAMPLES_SHOWN:]:
        with Image.open(path) as image:
            shown.append((image.convert("RGB"), path.name))
    return shown
