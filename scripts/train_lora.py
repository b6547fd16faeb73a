"""Train LoRA's webui entry point: registers the tab and the settings; everything else is in lib_lora.

The webui executes this file with the extension root on sys.path only while it runs
(webui-integration.md §1.4), so lib_lora is imported here, at top level; its submodules load lazily later.
"""

import lib_lora  # noqa: F401  (top level on purpose: see above)
from lib_lora.hosts import webui
from lib_lora.ui import TabSettings, build_tab
from modules import script_callbacks

TAB_TITLE, TAB_ID = "Train LoRA", "train_lora"


def on_ui_tabs():
    binding = webui.WebuiTab()
    settings = TabSettings(
        presets_dir=webui.presets_dir(),
        defaults=webui.config_defaults(),
        lora_dir=webui.output_dir(),
        captioners=webui.captioners(),
        job_lock=binding.session,  # queue_lock + model preparation and restoration, around every use of the model
    )
    return [(build_tab(binding.host, settings), TAB_TITLE, TAB_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(webui.add_settings)
script_callbacks.on_script_unloaded(webui.interrupt_active)
