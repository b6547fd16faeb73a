"""Command-line options of the Train LoRA extension (read as shared.cmd_opts.train_lora_*).

Runs before the webui parses its arguments; keep it import-light (no torch, no gradio).
"""


def preload(parser):
    group = parser.add_argument_group("Train LoRA")
    group.add_argument("--train-lora-dataset-root", type=str, default=None, help="Train LoRA: the only folder the tab and its HTTP API read datasets from (and prepare into); default: any folder")
    group.add_argument("--train-lora-output-dir", type=str, default=None, help="Train LoRA: folder for trained LoRA files (default: --lora-dir; elsewhere, the Lora tab will not list them)")
    group.add_argument("--train-lora-runs-dir", type=str, default=None, help="Train LoRA: folder for training runs: state, samples, logs (default: outputs/train-lora)")
