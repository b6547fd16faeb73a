"""Installs what Train LoRA needs and the webui lacks, with the webui's own pip helper.

The webui runs this file in its venv on every start (not with --skip-install). It only ever adds
packages, with --no-deps so that torch, gradio and the other pins of requirements_versions.txt are
never up- or downgraded (webui-integration.md §1.2). bitsandbytes (for AdamW8bit) only on request:
TRAIN_LORA_BITSANDBYTES=1 in the environment.
"""

import os

import launch

REQUIRED = {"lion-pytorch": "lion-pytorch>=0.1.2", "prodigyopt": "prodigyopt>=1.0"}
OPTIONAL = {"bitsandbytes": "bitsandbytes"}


def wanted() -> dict[str, str]:
    packages = dict(REQUIRED)
    if os.environ.get("TRAIN_LORA_BITSANDBYTES", "").strip().lower() in ("1", "true", "yes", "on"):
        packages |= OPTIONAL
    return packages


def main() -> None:
    for name, spec in wanted().items():
        if not launch.is_installed(name):
            launch.run_pip(f'install --no-deps "{spec}"', f"Train LoRA requirement: {name}")


main()
