"""HTML for the run panel: step math and warnings, the progress bar with ETA, the queue (no Gradio here)."""

from html import escape
from pathlib import Path

from .planning import PlanSummary
from .queue import QueueView
from .runner import JobState

SEPARATOR = " \u00b7 "
STATUS_TEXT = {"idle": "Not started", "starting": "Starting", "running": "Training", "stopping": "Stopping (saving at the next step)",
               "finished": "Finished", "interrupted": "Interrupted (saved)", "failed": "Failed"}


def duration(seconds: float | None) -> str:
    """"1h 02m", "3m 05s", "42s"; an em dash when unknown."""
    if seconds is None:
        return "\u2014"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _items(lines: list[str], css: str) -> str:
    return "".join(f'<li class="{css}">{escape(line)}</li>' for line in lines)


def summary_html(summary: PlanSummary) -> str:
    """Step math, repeats per folder, then warnings and the error that blocks a start."""
    parts = ['<div class="train-lora-summary">']
    if summary.steps_text:
        parts.append(f'<div class="train-lora-steps"><b>{summary.total_steps} steps</b>: {escape(summary.steps_text)}</div>')
    if summary.repeats:
        parts.append('<div class="train-lora-repeats">Repeats from folder names: ' + escape("; ".join(summary.repeats)) + "</div>")
    notes = ([summary.error] if summary.error else [])
    if notes or summary.warnings:
        parts.append('<ul class="train-lora-warnings">' + _items(notes, "train-lora-error") + _items(summary.warnings, "train-lora-warning") + "</ul>")
    return "".join(parts) + "</div>"


def progress_html(state: JobState, now: float | None = None) -> str:
    """Status line, a bar, and step / epoch / loss / lr / speed / elapsed / ETA."""
    fraction = state.step / state.total_steps if state.total_steps else 0.0
    if state.status == "finished":
        fraction = 1.0
    title = STATUS_TEXT.get(state.status, state.status)
    stats = [f"step {state.step}/{state.total_steps or '?'}", f"epoch {state.epoch}"]
    if state.avg_loss is not None:
        stats.append(f"loss {state.avg_loss:.4f}")
    if state.lr is not None:
        stats.append(f"lr {state.lr:.2e}")
    if state.it_per_s:
        stats.append(f"{state.it_per_s:.2f} it/s")
    stats += [f"elapsed {duration(state.elapsed(now))}", f"ETA {duration(state.eta(now))}"]
    error = f'<div class="train-lora-error">{escape(state.error)}</div>' if state.error else ""
    final = ""
    if state.result is not None and state.result.final_path:
        final = f'<div class="train-lora-final">Saved {escape(str(state.result.final_path))}</div>'
    return (f'<div class="train-lora-progress" data-status="{escape(state.status)}">'
            f'<div class="train-lora-status"><b>{escape(title)}</b> {escape(state.name)} {round(fraction * 100)}%</div>'
            f'<div class="train-lora-bar" style="background:rgba(128,128,128,.25);border-radius:4px;height:10px;overflow:hidden">'
            f'<div style="width:{fraction * 100:.1f}%;height:100%;background:#e8590c"></div></div>'
            f'<div class="train-lora-stats">{escape(SEPARATOR.join(stats))}</div>{error}{final}</div>')


def log_text(state: JobState, lines: int = 40) -> str:
    return "\n".join(state.log[-lines:])


def repeats_html(summary: PlanSummary) -> str:
    """The Training section's reminder that repeats are set by folder names, with the current ones."""
    if not summary.repeats:
        text = "Repeats come from the dataset's folder names (10_name = 10 repeats); they show here once the dataset folder and options are valid."
    else:
        text = "Repeats from folder names: " + "; ".join(summary.repeats) + (f" = {summary.total_steps} steps" if summary.total_steps else "")
    return f'<div class="train-lora-note">{escape(text)}</div>'


def queue_html(view: QueueView) -> str:
    """The waiting jobs in order (with the options that tell them apart), whether the queue is held, and how runs ended."""
    if view.jobs:
        state = ("<b>Held</b>: the jobs wait until you press Run queue (or Resume a run)" if view.held
                 else "They run in this order after the current run")
        rows = "".join(f'<tr><td>{i}</td><td>{escape(job.name)}</td><td title="{escape(job.config.train_data_dir)}">'
                       f"{escape(Path(job.config.train_data_dir).name)}</td><td>{escape(_job_options(job.config))}</td></tr>"
                       for i, job in enumerate(view.jobs, 1))
        parts = [f'<div class="train-lora-note">{len(view.jobs)} queued job(s). {state}.</div>'
                 f'<table class="train-lora-table"><thead><tr><th>#</th><th>output name</th><th>dataset</th><th>options</th></tr></thead>'
                 f"<tbody>{rows}</tbody></table>"]
    else:
        parts = ['<div class="train-lora-note">The queue is empty. Add to queue saves the current options as a job; it runs after the current run.</div>']
    if view.done:
        ended = SEPARATOR.join(f"{s.name or 'run'} {s.status}" + (f" ({s.error})" if s.error else "") for s in view.done[-5:])
        parts.append(f'<div class="train-lora-queue-done">Ended: {escape(ended)}</div>')
    if view.problems:
        parts.append('<ul class="train-lora-warnings">' + _items(view.problems, "train-lora-warning") + "</ul>")
    return '<div class="train-lora-queue">' + "".join(parts) + "</div>"


def _job_options(config) -> str:
    width, height = config.resolution
    return f"{config.network_type} {config.network_dim}, {width}x{height}, {config.max_train_epochs} ep, batch {config.train_batch_size}"
