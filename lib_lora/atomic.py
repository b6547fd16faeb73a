"""Writing a file so that it is either the old file or the whole new one: never half-written, never lost.

The new content goes to a temporary file beside the target, is flushed to disk and given the
permissions a plain write would give (recent safetensors create files 0600; the webui may read them
as another user), and only then is renamed over the target. A failure on the way (a full disk, a
check that refuses) leaves the target as it was and no temporary file behind. A full disk is told
apart and reported as a `DiskFullError` naming the file kept, the space needed and the space free.
"""

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
DISK_FULL_TEXTS = ("os error 28", "os error 112")  # safetensors' Rust writer: ENOSPC (Linux, macOS), ERROR_DISK_FULL (Windows)


class DiskFullError(OSError, ValueError):
    """Not enough disk space for a file; nothing was replaced. A ValueError too: its message is meant for the user."""


def format_bytes(size: int) -> str:
    """`1.2 GB`, `340.0 MB`, `12.5 kB`, `512 bytes`: free and needed space as people read it."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB" if size >= 1000 else f"{size} bytes"


def free_bytes(folder: Path) -> int:
    """Free space in `folder` (or its nearest existing parent: a folder about to be created)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def require_free_space(folder: str | os.PathLike, needed: int, purpose: str) -> None:
    """Refuse up front, naming the folder and both sizes, when `purpose` needs more than the free space."""
    if needed <= 0:
        return
    free = free_bytes(Path(folder))
    if needed > free:
        raise DiskFullError(f"not enough free disk space in {folder} for {purpose}: it needs about {format_bytes(needed)} "
                            f"and {format_bytes(free)} is free; free some space or choose another folder")


def plain_file_mode() -> int:
    """The permissions `open(path, "w")` gives a new file here: 0o666 less the umask (read without changing it)."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
        os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], before_replace: Callable[[], None] | None = None,
                     *, size: int = 0) -> Path:
    """`write(tmp)` fills a temporary file, which then replaces `path` (after `before_replace`, which may refuse).

    `size`, the expected file size when known, is checked against the free space first; a write that
    runs out of space raises `DiskFullError` saying the previous file is kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        require_free_space(path.parent, size, f"{path.name} ({_what_was_kept(path)})")
        write(tmp)
        os.chmod(tmp, plain_file_mode())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except Exception as error:  # classified, then raised again: a full disk gets a message that says what was kept
        needed = max(size, tmp.stat().st_size if tmp.exists() else 0)
        tmp.unlink(missing_ok=True)
        if not isinstance(error, DiskFullError) and _ran_out_of_space(error, path.parent, needed):
            raise DiskFullError(f"the disk is full: {path} was not saved; {_what_was_kept(path)}; {_space_left(path.parent, needed)}; "
                                "free some space and try again") from error
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def _what_was_kept(path: Path) -> str:
    return f"the previous {path.name} is kept unchanged" if path.exists() else f"no {path.name} was there before"


def _space_left(folder: Path, needed: int) -> str:
    free = format_bytes(free_bytes(folder))
    return f"it needs about {format_bytes(needed)} in {folder}, where {free} is free" if needed else f"{free} is free in {folder}"


def _ran_out_of_space(error: BaseException, folder: Path, needed: int) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, safetensors' text for it, or (torch.save's C++ writer says only
    'unexpected pos') a folder with less free space than the file needs."""
    seen = error
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS) or any(text in str(seen) for text in DISK_FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return needed > 0 and free_bytes(folder) < needed
