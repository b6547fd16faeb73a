"""modules.script_callbacks: registrations are recorded, never called by the stand-in."""

registered: dict[str, list] = {}


def _register(kind):
    def add(fn):
        registered.setdefault(kind, []).append(fn)

    return add


on_ui_tabs = _register("ui_tabs")
on_ui_settings = _register("ui_settings")
on_script_unloaded = _register("script_unloaded")
on_app_started = _register("app_started")
on_model_loaded = _register("model_loaded")
on_before_ui = _register("before_ui")
