"""Train LoRA's webui entry point: registers the tab, the settings and the HTTP API; everything else is in lib_lora.

The webui executes this file with the extension root on sys.path only while it runs
(webui-integration.md §1.4), so lib_lora is imported here, at top level; its submodules load lazily later.
"""

import lib_lora  # noqa: F401  (top level on purpose: see above)
from lib_lora.hosts import forge, webui
from lib_lora.ui import TabSettings, build_tab, make_controller
from modules import script_callbacks, shared

TAB_TITLE, TAB_ID = "Train LoRA", "train_lora"
_controller = None  # the tab's and the HTTP API's, so both see one job and one queue; made by whichever asks first


def controller():
    global _controller
    if _controller is None:
        binding = forge.ForgeTab() if forge.running_in_forge() else webui.WebuiTab()  # Forge: a top-level tab too
        settings = TabSettings(
            presets_dir=webui.presets_dir(),
            defaults=webui.config_defaults(),
            lora_dir=webui.output_dir(),
            runs_dir=webui.runs_dir(),
            tool_lora_dirs=webui.lora_dirs(),
            checkpoint_dirs=webui.checkpoint_dirs(),
            dataset_roots=(webui.dataset_root(),) if webui.dataset_root() else (),
            captioners=webui.captioners(),
            job_lock=binding.session,  # queue_lock + model preparation and restoration, around every use of the model
        )
        _controller = make_controller(binding.host, settings)
    return _controller


def on_ui_tabs():
    return [(build_tab(controller()), TAB_TITLE, TAB_ID)]


def on_app_started(demo, app):
    """The HTTP API under /train-lora/v1/ on the webui's FastAPI app (with --nowebui too), behind --api-auth as the webui's own API."""
    from lib_lora.ui.api import add_api_routes, parse_api_auth

    add_api_routes(app, controller(), credentials=parse_api_auth(getattr(shared.cmd_opts, "api_auth", None)))


def hold_queue():
    """Reload UI: this file runs again and makes a new controller over the same queue folder; this one starts no more jobs."""
    if _controller is not None:
        _controller.queue_held = True


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(webui.add_settings)
script_callbacks.on_script_unloaded(hold_queue)
script_callbacks.on_script_unloaded(webui.interrupt_active)
script_callbacks.on_app_started(on_app_started)
