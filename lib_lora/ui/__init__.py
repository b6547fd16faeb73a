"""The Train LoRA tab (Gradio), shared by the webui extension and `python -m lib_lora ui`.

Gradio is imported only by `tab.py`, `wiring.py`, `tools_tab.py` and `app.py`; everything the tab
computes (step math, warnings, the dataset report, the loss chart, tag edits, crops, the comparison
grid, keeping an epoch, the background job, the Tools section's `toolbox.py`) lives in plain modules
beside them, tested without Gradio.

Embedding (the webui's `on_ui_tabs`, and `on_app_started` for the HTTP API, `api.py`)::

    from lib_lora.ui import TabSettings, build_tab, make_controller
    controller = make_controller(make_host, TabSettings(presets_dir=..., job_lock=lambda: queue_lock))
    blocks = build_tab(controller)                      # the tab
    add_api_routes(app, controller, credentials=...)    # lib_lora.ui.api: the same job and queue
"""

from .settings import TabSettings

__all__ = ["TabSettings", "build_tab", "make_controller"]


def make_controller(host, settings: TabSettings | None = None):
    """The tab's TabController (no Gradio): `host` is a Host or a zero-argument factory called when the model is needed."""
    from .controller import TabController

    return TabController(host, settings)


def build_tab(host, settings: TabSettings | None = None):
    """The tab as a `gr.Blocks`; `host` is a Host, a zero-argument factory called when the model is needed, or a controller."""
    from .tab import build_tab as build

    return build(host, settings)
