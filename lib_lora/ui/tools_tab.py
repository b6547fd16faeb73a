"""The tab's "Tools" section (Gradio): one accordion per tool of `lib_lora.tools`, each writing a new file.

Layout and wiring only; what the tools do with the fields is `Toolbox` (plain, tested without a
browser). Each handler returns one HTML block: the note naming the file written and its per-module
report, or the error naming the field. The file lists refresh when the section or the list is opened.
"""

from collections.abc import Callable
from html import escape

import gradio as gr
import torch

from ..tools.common import Progress
from .tab import USER_ERRORS, note
from .toolbox import AS_INPUT, PRECISIONS, RESIZE_RULES, ToolOutput, Toolbox

CONV_RANK_INFO = "3x3 convs (0: the rank)"


def tracked(progress) -> Progress:
    """The tools' `progress(items, description)` as Gradio's progress bar (module i of n)."""
    def track(items, description):
        items = list(items)
        for index, item in enumerate(items):
            progress((index, len(items)), desc=description)
            yield item
    return track


def shown(run: Callable[[], ToolOutput | str]) -> str:
    """What a tool's panel shows: its note and report (or inspect's text), or the user error."""
    try:
        output = run()
    except USER_ERRORS as e:
        return note(str(e), "error")
    if isinstance(output, str):
        return f'<pre class="train-lora-inspect">{escape(output)}</pre>'
    return output.note + output.report


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class ToolsPanel:
    """Widgets of the Tools section (`build` inside the tab's layout, then `wire`) and its handlers."""

    def __init__(self, toolbox: Toolbox, elem_id: Callable[[str], str]):
        self.tools = toolbox
        self.id = elem_id
        self.lora_pickers: list = []
        self.checkpoint_pickers: list = []

    # --- layout
    def lora_picker(self, label: str, name: str, multiselect: bool = False):
        picker = gr.Dropdown(choices=list(self.tools.loras(ask=False)), label=label, multiselect=multiselect, elem_id=self.id(name))
        self.lora_pickers.append(picker)
        return picker

    def checkpoint_picker(self, label: str, name: str):
        picker = gr.Dropdown(choices=list(self.tools.checkpoints()), label=label, elem_id=self.id(name))
        self.checkpoint_pickers.append(picker)
        return picker

    def output_fields(self, name: str, button: str, placeholder: str):
        with gr.Row():
            field = gr.Textbox(label="Output name", placeholder=placeholder, info="a new file name; an existing file is never replaced",
                               elem_id=self.id(name + "_name"), scale=3)
            run = gr.Button(button, variant="primary", elem_id=self.id(name + "_run"), scale=1)
        return field, run, gr.HTML(elem_id=self.id(name + "_result"))

    def build(self):
        with gr.Column(elem_id=self.id("tools")):
            self.build_inspect()
            self.build_blend()
            self.build_resize()
            self.build_extract()
            self.build_bake()

    def build_inspect(self):
        with gr.Accordion("Inspect a LoRA", open=True, elem_id=self.id("tool_inspect")):
            with gr.Row():
                self.inspect_file = self.lora_picker("LoRA file", "inspect_file")
                self.inspect_run = gr.Button("Inspect", elem_id=self.id("inspect_run"))
            self.inspect_result = gr.HTML(elem_id=self.id("inspect_result"))

    def number(self, name: str, label: str, value: float, info: str | None = None, whole: bool = True):
        return gr.Number(label=label, value=value, precision=0 if whole else None, info=info, elem_id=self.id(name))

    def precision(self, name: str, value: str = AS_INPUT):
        return gr.Dropdown(choices=list(PRECISIONS), value=value, label="Save as", elem_id=self.id(name + "_precision"))

    def build_blend(self):
        with gr.Accordion("Blend LoRAs into one", open=False, elem_id=self.id("tool_blend")):
            with gr.Row():
                self.blend_files = self.lora_picker("LoRA files", "blend_files", multiselect=True)
                self.blend_weights = gr.Textbox(label="Weights", placeholder="1, 0.5", info="one per file, in their order; empty: 1 each",
                                                elem_id=self.id("blend_weights"))
            with gr.Row():
                self.blend_rank = self.number("blend_rank", "Rank", 0, "0: exact, the ranks add up; a rank: SVD to it")
                self.blend_conv_rank = self.number("blend_conv_rank", "Conv rank", 0, CONV_RANK_INFO)
                self.blend_precision = self.precision("blend")
            self.blend_name, self.blend_run, self.blend_result = self.output_fields("blend", "Blend", "my_blend")

    def build_resize(self):
        with gr.Accordion("Resize a LoRA", open=False, elem_id=self.id("tool_resize")):
            with gr.Row():
                self.resize_file = self.lora_picker("LoRA file", "resize_file")
                self.resize_method = gr.Dropdown(choices=list(RESIZE_RULES), value="fixed rank", label="Keep", elem_id=self.id("resize_method"))
            with gr.Row():
                self.resize_rank = self.number("resize_rank", "Rank", 8, "the new rank; with a kept fraction, the most kept (0: no limit)")
                self.resize_kept = self.number("resize_kept", "Kept", 0.9, "fraction 0..1 (sv_fro, sv_cumulative) or ratio >= 1 (sv_ratio)",
                                               whole=False)
                self.resize_conv_rank = self.number("resize_conv_rank", "Conv rank", 0, CONV_RANK_INFO)
                self.resize_precision = self.precision("resize")
            self.resize_name, self.resize_run, self.resize_result = self.output_fields("resize", "Resize", "my_lora_r8")

    def build_extract(self):
        with gr.Accordion("Extract a LoRA from two checkpoints", open=False, elem_id=self.id("tool_extract")):
            with gr.Row():
                self.extract_base = self.checkpoint_picker("Base checkpoint", "extract_base")
                self.extract_tuned = self.checkpoint_picker("Tuned checkpoint", "extract_tuned")
            with gr.Row():
                self.extract_rank = self.number("extract_rank", "Rank", 16)
                self.extract_conv_rank = self.number("extract_conv_rank", "Conv rank", 0, "0: no 3x3 convs (LoRA); a rank: LoCon")
                self.extract_min_diff = self.number("extract_min_diff", "Minimum difference", 0.01, "layers differing less are left out", whole=False)
            with gr.Row():
                self.extract_precision = self.precision("extract", "fp16")
                self.extract_device = gr.Dropdown(choices=devices(), value="cpu", label="SVD on", elem_id=self.id("extract_device"))
            self.extract_name, self.extract_run, self.extract_result = self.output_fields("extract", "Extract", "my_extracted_lora")

    def build_bake(self):
        with gr.Accordion("Bake LoRAs into a checkpoint", open=False, elem_id=self.id("tool_bake")):
            with gr.Row():
                self.bake_base = self.checkpoint_picker("Base checkpoint", "bake_base")
                self.bake_files = self.lora_picker("LoRA files", "bake_files", multiselect=True)
            with gr.Row():
                self.bake_weights = gr.Textbox(label="Weights", placeholder="1, 0.5", info="one per LoRA, in their order; empty: 1 each",
                                               elem_id=self.id("bake_weights"))
                self.bake_fp16 = gr.Checkbox(label="Save in fp16", value=False, elem_id=self.id("bake_fp16"))
            self.bake_name, self.bake_run, self.bake_result = self.output_fields("bake", "Bake", "my_merged_model")

    # --- handlers (what the buttons call)
    def inspect(self, label):
        return shown(lambda: self.tools.inspect(label or ""))

    def blend(self, labels, weights, rank, conv_rank, precision, name, progress=gr.Progress()):
        return shown(lambda: self.tools.blend(labels or [], weights, name, rank, conv_rank, precision, progress=tracked(progress)))

    def resize(self, label, method, rank, kept, conv_rank, precision, name, progress=gr.Progress()):
        return shown(lambda: self.tools.resize(label or "", name, method, rank, kept, conv_rank, precision, progress=tracked(progress)))

    def extract(self, base, tuned, rank, conv_rank, min_diff, precision, device, name, progress=gr.Progress()):
        return shown(lambda: self.tools.extract(base or "", tuned or "", name, rank, conv_rank, min_diff, precision, device or "cpu",
                                                progress=tracked(progress)))

    def bake(self, base, labels, weights, fp16, name, progress=gr.Progress()):
        progress(None, desc="baking: loading, merging and saving the checkpoint")
        return shown(lambda: self.tools.bake(base or "", labels or [], weights, name, bool(fp16)))

    def listed(self) -> list:
        """Fresh choices for every picker (LoRA pickers, then checkpoint pickers)."""
        loras, checkpoints = list(self.tools.loras()), list(self.tools.checkpoints())
        return [gr.update(choices=loras)] * len(self.lora_pickers) + [gr.update(choices=checkpoints)] * len(self.checkpoint_pickers)

    # --- wiring
    def wire(self, opened):
        """`opened`: the section's tab, whose opening refreshes every file list (an open list shows no late update)."""
        opened.select(self.listed, None, [*self.lora_pickers, *self.checkpoint_pickers], queue=False, show_progress="hidden")
        self.inspect_run.click(self.inspect, [self.inspect_file], [self.inspect_result])
        self.blend_run.click(self.blend, [self.blend_files, self.blend_weights, self.blend_rank, self.blend_conv_rank, self.blend_precision,
                                          self.blend_name], [self.blend_result])
        self.resize_run.click(self.resize, [self.resize_file, self.resize_method, self.resize_rank, self.resize_kept, self.resize_conv_rank,
                                            self.resize_precision, self.resize_name], [self.resize_result])
        self.extract_run.click(self.extract, [self.extract_base, self.extract_tuned, self.extract_rank, self.extract_conv_rank,
                                              self.extract_min_diff, self.extract_precision, self.extract_device, self.extract_name],
                               [self.extract_result])
        self.bake_run.click(self.bake, [self.bake_base, self.bake_files, self.bake_weights, self.bake_fp16, self.bake_name], [self.bake_result])
        for picker in self.lora_pickers:
            picker.focus(lambda: gr.update(choices=list(self.tools.loras())), None, [picker], queue=False, show_progress="hidden")
        for picker in self.checkpoint_pickers:
            picker.focus(lambda: gr.update(choices=list(self.tools.checkpoints())), None, [picker], queue=False, show_progress="hidden")
