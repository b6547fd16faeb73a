"""Events of the Train LoRA tab: each handler turns widget values into a `TabController` call
and its result into component updates. User errors are shown in the tab, never raised to Gradio.
"""

from html import escape

import gradio as gr

from .controller import CompareRequest
from .prepare import parse_size, prepare_folder
from .report import report_html
from .status import progress_html, queue_html, repeats_html, summary_html
from .tab import USER_ERRORS, TrainTab, listener_kwargs, note, poll, reporting
from .tags import apply_tag_edits, parse_tag_edit, plan_tag_edits, preview_rows

# Options whose change alters the step math or a warning: the summary listens to these.
SUMMARY_FIELDS = ("train_data_dir", "reg_data_dir", "trigger_words", "caption_extension", "resolution", "enable_bucket", "min_bucket_reso",
                  "max_bucket_reso", "bucket_no_upscale", "train_batch_size", "max_train_epochs", "gradient_accumulation_steps",
                  "max_train_steps", "validation_split", "network_type", "network_dim", "network_alpha", "conv_dim", "conv_alpha",
                  "optimizer_type", "learning_rate", "unet_lr", "text_encoder_lr", "cache_latents", "random_crop", "shuffle_caption",
                  "caption_dropout_rate", "caption_tag_dropout_rate", "network_train_unet_only", "network_train_text_encoder_only",
                  "clip_skip", "v_parameterization", "zero_terminal_snr")


def wire(tab: TrainTab) -> None:
    wire_options(tab)
    wire_prepare(tab)
    wire_run(tab)
    wire_queue(tab)
    wire_after(tab)
    tab.tools.wire(opened=tab.tools_tab)


def wire_options(tab: TrainTab) -> None:
    def update_summary(*args):
        summary = tab.c.summary(tab.values(args))
        return summary_html(summary), repeats_html(summary)

    for name in SUMMARY_FIELDS:
        tab.widgets[name].change(update_summary, tab.inputs, [tab.summary, tab.repeats], queue=False, show_progress="hidden")

    def scan(*args):
        values = tab.values(args)
        summary = tab.c.summary(values)
        return report_html(tab.c.report(values)), tab.c.thumbnails(values["train_data_dir"]), summary_html(summary), repeats_html(summary)

    failed_scan = lambda message: (note(message, "error"), [], gr.update(), gr.update())
    tab.scan.click(reporting(scan, failed_scan), tab.inputs, [tab.report, tab.thumbs, tab.summary, tab.repeats])

    def load_preset(name, *args):
        if not name:
            return [gr.update()] * len(tab.widgets) + [note("choose a preset first", "error")]
        values, message = tab.c.apply_preset(name, tab.values(args))
        return [gr.update(value=values[n]) for n in tab.names] + [note(message)]

    failed_load = lambda message: [gr.update()] * len(tab.widgets) + [note(message, "error")]
    tab.preset_load.click(reporting(load_preset, failed_load), [tab.preset, *tab.inputs], [*tab.inputs, tab.preset_note])

    def save_preset(name, replace, *args):
        message = tab.c.save_preset(name or "", tab.values(args), bool(replace))
        return note(message), gr.update(choices=tab.c.preset_names(), value=name.strip())

    tab.preset_save.click(reporting(save_preset, lambda m: (note(m, "error"), gr.update())), [tab.preset_name, tab.preset_replace, *tab.inputs],
                          [tab.preset_note, tab.preset])
    if tab.c.host is None:  # the webui: its model can change, so the list follows the one loaded when it is opened
        tab.preset.focus(lambda: gr.update(choices=tab.c.preset_names(ask=True)), None, [tab.preset], queue=False, show_progress="hidden")


def wire_prepare(tab: TrainTab) -> None:
    def prepare(source, destination, size, mode, use, dataset, progress=gr.Progress()):
        try:
            tab.c.check_dataset_folder("Source folder", source or dataset)
            tab.c.check_dataset_folder("New folder", destination)
            result = prepare_folder(source or dataset, destination, parse_size(size), mode, progress=lambda i, n: progress((i, n), desc="resizing"))
        except USER_ERRORS as e:
            return note(str(e), "error"), gr.update()
        skipped = f"; skipped {len(result.skipped)}: " + "; ".join(result.skipped[:3]) if result.skipped else ""
        message = f"wrote {result.written} image(s) and {result.captions} caption file(s) to {result.folder}{skipped}"
        return note(message), (str(result.folder) if use else gr.update())

    w = tab.widgets
    tab.prep_run.click(prepare, [tab.prep_source, tab.prep_dest, tab.prep_size, tab.prep_mode, tab.prep_use, w["train_data_dir"]],
                       [tab.prep_note, w["train_data_dir"]])
    pending = gr.State([])
    edit_inputs = [w["train_data_dir"], w["caption_extension"], tab.tag_remove, tab.tag_replace, tab.tag_add, tab.tag_front, tab.tag_min]

    def preview(folder, extension, remove, replace, add, front, min_count):
        tab.c.check_dataset_folder("train_data_dir", folder)
        changes = plan_tag_edits(folder, parse_tag_edit(remove, replace, add, front, min_count or 0), extension)
        return changes_html(changes), changes

    tab.tag_preview.click(reporting(preview, lambda m: (note(m, "error"), [])), edit_inputs, [tab.tag_table, pending])

    def apply(changes):
        if not changes:
            return note("nothing to apply: press Preview first", "error"), []
        written, skipped = apply_tag_edits(changes)
        return note(f"rewrote {written} caption file(s)" + ("; " + "; ".join(skipped) if skipped else "")), []

    tab.tag_apply.click(reporting(apply, lambda m: (note(m, "error"), [])), [pending], [tab.tag_table, pending])

    def caption(folder, model, mode, extension, progress=gr.Progress()):
        try:
            return note(tab.c.caption(folder, model, mode, extension, progress=lambda i, n: progress((i, n), desc="captioning")))
        except USER_ERRORS as e:
            return note(str(e), "error")

    tab.cap_run.click(caption, [w["train_data_dir"], tab.cap_model, tab.cap_mode, w["caption_extension"]], [tab.cap_note])


def changes_html(changes) -> str:
    if not changes:
        return note("no caption file would change")
    rows = "".join(f"<tr><td>{escape(f)}</td><td>{escape(b)}</td><td>{escape(a)}</td></tr>" for f, b, a in preview_rows(changes))
    more = f"<p>and {len(changes) - len(preview_rows(changes))} more</p>" if len(changes) > len(preview_rows(changes)) else ""
    return (f"<p>{len(changes)} caption file(s) would change. Press Apply to write them.</p>"
            f'<table class="train-lora-table"><thead><tr><th>file</th><th>before</th><th>after</th></tr></thead><tbody>{rows}</tbody></table>{more}')


def watcher(tab: TrainTab):
    def watch():
        yield from poll(tab)
    return watch


def wire_run(tab: TrainTab) -> None:
    watched, watch = tab.watched, watcher(tab)

    def start(*args):
        tab.c.start(tab.values(args))
        return progress_html(tab.c.snapshot()), ""

    def resume(run_dir):
        tab.c.start({}, resume=True, run_dir=run_dir or "")
        return progress_html(tab.c.snapshot()), ""

    refused = lambda message: (progress_html(tab.c.snapshot()), note(message, "error"))  # noqa: E731 - a run is active: follow it

    def interrupt():
        tab.c.interrupt()
        return progress_html(tab.c.snapshot())

    def list_files(*args):
        return files_update(tab, tab.values(args))

    for button, fn, inputs in ((tab.train, start, tab.inputs), (tab.resume, resume, [tab.run_dir])):
        button.click(reporting(fn, refused), inputs, [tab.progress, tab.run_note], queue=False).then(watch, None, watched, **listener_kwargs()).then(
            list_files, tab.inputs, [tab.keep_file])
    tab.refresh.click(watch, None, watched, **listener_kwargs())
    tab.blocks.load(watch, None, watched, **listener_kwargs())  # a page reload (webui and app alike) re-attaches to the run
    tab.stop.click(interrupt, None, [tab.progress], queue=False)


def wire_queue(tab: TrainTab) -> None:
    """Add to queue, and the queue panel's Up / Down / Remove / Run queue on the chosen job."""
    panel = [tab.queue_note, tab.queue_view, tab.queue_job]

    def shown(message: str, kind: str = "info", selected=None):
        names = [job.name for job in tab.c.queued()]
        return note(message, kind), queue_html(tab.c.queue_view()), gr.update(choices=names, value=selected if selected in names else None)

    failed = lambda message: (note(message, "error"), gr.update(), gr.update())  # noqa: E731
    add = reporting(lambda *args: shown(tab.c.add_to_queue(tab.values(args))), failed)
    tab.queue_add.click(add, tab.inputs, panel, queue=False).then(watcher(tab), None, tab.watched, **listener_kwargs())
    for button, offset in ((tab.queue_up, -1), (tab.queue_down, 1)):
        move = lambda name, offset=offset: shown(tab.c.move_queued(name or "", offset), selected=name)  # noqa: E731
        button.click(reporting(move, failed), [tab.queue_job], panel, queue=False)
    tab.queue_remove.click(reporting(lambda name: shown(tab.c.remove_queued(name or "")), failed), [tab.queue_job], panel, queue=False)
    resume = reporting(lambda: shown(tab.c.resume_queue()), failed)
    tab.queue_run.click(resume, None, panel, queue=False).then(watcher(tab), None, tab.watched, **listener_kwargs())
    tab.queue_job.focus(lambda: gr.update(choices=[job.name for job in tab.c.queued()]), None, [tab.queue_job], queue=False, show_progress="hidden")


def files_update(tab: TrainTab, values: dict):
    labels = [f.label for f in tab.c.saved_files(values)]
    return gr.update(choices=labels, value=labels[-1] if labels else None)


def wire_after(tab: TrainTab) -> None:
    tab.keep_list.click(reporting(lambda *args: files_update(tab, tab.values(args)), lambda m: gr.update()), tab.inputs, [tab.keep_file])

    def compare(prompt, weights, seed, steps, cfg, *args, progress=gr.Progress()):
        try:
            request = CompareRequest(prompt, weights, int(seed or 0), int(steps or 20), float(cfg or 7.0))
            grid = tab.c.comparison(tab.values(args), request, progress=lambda i, n: progress((i, n), desc="generating"))
        except USER_ERRORS as e:
            return gr.update(), note(str(e), "error")
        return grid, note("rows: saved files, columns: LoRA weight; same seed everywhere")

    tab.cmp_run.click(compare, [tab.cmp_prompt, tab.cmp_weights, tab.cmp_seed, tab.cmp_steps, tab.cmp_cfg, *tab.inputs], [tab.cmp_grid, tab.keep_note])

    def keep(label, name, replace, delete, *args):
        values = tab.values(args)
        message = tab.c.keep(values, label or "", name or "", bool(replace), bool(delete))
        return note(message), files_update(tab, values)

    tab.keep_run.click(reporting(keep, lambda m: (note(m, "error"), gr.update())),
                       [tab.keep_file, tab.keep_name, tab.keep_replace, tab.keep_delete, *tab.inputs], [tab.keep_note, tab.keep_file])
