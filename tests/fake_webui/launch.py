"""The webui's `launch` module as install.py sees it: is_installed and run_pip (recorded)."""

installed: set[str] = {"torch", "gradio"}
pip_calls: list[tuple[str, str]] = []


def is_installed(package: str) -> bool:
    return package in installed


def run_pip(command: str, desc: str = None, live: bool = False):
    pip_calls.append((command, desc))
