"""modules.shared: sd_model, opts, cmd_opts, state, loaded_hypernetworks."""

from types import SimpleNamespace

from modules import calls


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, refresh=None,
                 comment_before="", comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.category_id, self.comment_after = section, category_id, comment_after

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


class Options:
    def __init__(self):
        self.data = {"CLIP_stop_at_last_layers": 1, "training_xattention_optimizations": False, "sd_model_checkpoint": "tiny.safetensors [0000000000]"}
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def set(self, key, value, is_api=False, run_callbacks=True):
        self.data[key] = value

    def __getattr__(self, key):
        data = self.__dict__.get("data", {})
        if key in data:
            return data[key]
        raise AttributeError(key)


class State:
    def __init__(self):
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.sampling_step, self.sampling_steps = 0, 0
        self.interrupted, self.skipped, self.stopping_generation = False, False, False
        self.current_image, self.id_live_preview = None, 0

    def begin(self, job="(unknown)"):
        calls.append(f"state.begin({job})")
        self.job, self.job_no, self.job_count, self.interrupted = job, 0, -1, False

    def end(self):
        calls.append("state.end")
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1


opts = Options()
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, lora_dir=None, train_lora_output_dir=None, train_lora_runs_dir=None, train_lora_dataset_root=None)
state = State()
loaded_hypernetworks: list = []
sd_model = None
device = "cpu"
