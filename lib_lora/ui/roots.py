"""Which folders the tab and the HTTP API may read and write (issue #19).

The webui is often shared on a LAN (`--listen`), and the standalone app can be bound to one, so a path
typed in a field or sent in a request is not trusted: it is resolved (symlinks, `..` and `~` followed)
and only then compared with the folders allowed for it. Datasets (and everything read or written
beside them: regularization images, tag edits, captioning, resized copies) must lie under the dataset
roots the server was started with (`--train-lora-dataset-root` in the webui, `--dataset-root`
standalone; none given: anywhere the user can read). LoRA files go under the Lora folder, and resumed
runs come from the runs folder, always. The command line (`python -m lib_lora train`) is the user's
own shell and is not limited.
"""

from collections.abc import Sequence
from pathlib import Path

from ..train.config import ConfigError, TrainConfig

DATASET_FIELDS = ("train_data_dir", "reg_data_dir")


def resolved(field: str, path: str | Path) -> Path:
    """`path` absolute with every symlink and `..` followed (as the OS will open it); ConfigError naming `field`
    for a path no OS can open (a NUL byte)."""
    try:
        return Path(path).expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as e:  # NUL byte, symlink loop
        raise ConfigError(f"{field}: {str(path)!r} is not a usable path ({e})") from e


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_inside(field: str, path: str | Path, roots: Sequence[Path], what: str) -> None:
    """ConfigError naming `field` and the roots unless `path` resolves inside one of `roots` (none: any path).
    An empty `path` (an option left unset) passes."""
    if not roots or not str(path).strip():
        return
    real = resolved(field, path)
    if not any(is_inside(real, resolved(field, root)) for root in roots):
        shown = str(path) if real == Path(path) else f"{path} (that is {real})"
        raise ConfigError(f"{field}: {shown} is outside {what} {', '.join(str(r) for r in roots)}; choose a folder inside it")


def check_dataset_folder(field: str, path: str | Path, roots: Sequence[Path]) -> None:
    check_inside(field, path, roots, "the dataset root(s) this server allows (--dataset-root, webui: --train-lora-dataset-root):")


def check_config_paths(config: TrainConfig, *, dataset_roots: Sequence[Path], lora_dir: Path | None) -> None:
    """The folders a run from the tab or the API reads and writes: datasets under the dataset roots,
    output_dir under the Lora folder (when known: the trainer puts an empty one there)."""
    for field in DATASET_FIELDS:
        check_dataset_folder(field, getattr(config, field), dataset_roots)
    if lora_dir is not None:
        check_inside("output_dir", config.output_dir, [lora_dir], "the Lora folder")
