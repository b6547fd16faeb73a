"""The Train LoRA tab (Gradio), shared by the webui extension and `python -m lib_lora ui`.

Gradio is imported only by `tab.py`, `wiring.py` and `app.py`; everything the tab computes
(step math, warnings, the dataset report, the loss chart, tag edits, crops, the comparison grid,
keeping an epoch, the background job) lives in plain modules beside them, tested without Gradio.

Embedding (the webui's `on_ui_tabs`)::

    from lib_lora.ui import TabSettings, build_tab
    blocks = build_tab(make_host, TabSettings(presets_dir=..., job_lock=lambda: queue_lock))
"""

from .settings import TabSettings

__all__ = ["TabSettings", "build_tab"]


def build_tab(host, settings: TabSettings | None = None):
    """The tab as a `gr.Blocks`; `host` is a Host or a zero-argument factory called when the model is needed."""
    from .tab import build_tab as build

    return build(host, settings)
