"""Writing a file so that it is either the old file or the whole new one: never half-written, never lost.

The new content goes to a temporary file beside the target, is flushed to disk and given the
permissions a plain write would give (recent safetensors create files 0600; the webui may read them
as another user), and only then is renamed over the target. A failure on the way (a full disk, a
check that refuses) leaves the target as it was and no temporary file behind.
"""

import os
from collections.abc import Callable
from pathlib import Path


def plain_file_mode() -> int:
    """The permissions `open(path, "w")` gives a new file here: 0o666 less the umask (read without changing it)."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
        os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], before_replace: Callable[[], None] | None = None) -> Path:
    """`write(tmp)` fills a temporary file, which then replaces `path` (after `before_replace`, which may refuse)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, plain_file_mode())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
