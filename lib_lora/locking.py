"""A folder that one process at a time works in: an OS file lock, released by the OS when its process dies.

The lock is `fcntl.flock` (Linux, macOS) or `msvcrt.locking` (Windows) on a lock file in the folder,
which also records the holder's PID for messages. Whether the holder lives is asked of the lock
itself, never by signalling the PID (`os.kill(pid, 0)` sends CTRL_C_EVENT on Windows). The file is
never deleted (two processes could then lock two different files); a clean release empties it, so a
PID still written there when the lock is free means its process died holding it: a stale lock,
taken over with a notice.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

WINDOWS_LOCKED_BYTE = 1 << 20  # msvcrt locks a byte range and blocks reading it: lock one byte far past the PID text


class FolderLockedError(ValueError):
    """Another live process holds the folder; the message names the folder and that process."""


@contextmanager
def folder_lock(folder: Path, lock_name: str) -> Iterator[int | None]:
    """Hold `<folder>/<lock_name>` for the block; yields the PID of a dead holder whose lock was taken over, else None.
    Raises FolderLockedError naming the folder and the PID holding it."""
    path = Path(folder) / lock_name
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666), "r+b")  # created, never truncated
    try:
        _lock(handle)
    except OSError:
        holder = _recorded_pid(handle)
        handle.close()
        raise FolderLockedError(f"{folder} is in use by {f'process {holder}' if holder else 'another process'} (it holds {path}); "
                                "wait for that run to finish or stop it, then try again") from None
    try:
        stale = _recorded_pid(handle)
        _record(handle, f"{os.getpid()}\n")
        yield stale
    finally:
        _record(handle, "")  # released cleanly: the next holder finds no PID, so no notice
        _unlock(handle)
        handle.close()


def _recorded_pid(handle: BinaryIO) -> int | None:
    handle.seek(0)
    text = handle.read(32).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _record(handle: BinaryIO, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text.encode("ascii"))
    handle.flush()


if os.name == "nt":
    import msvcrt

    def _lock(handle: BinaryIO) -> None:
        handle.seek(WINDOWS_LOCKED_BYTE)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # OSError at once if another handle holds it

    def _unlock(handle: BinaryIO) -> None:
        handle.seek(WINDOWS_LOCKED_BYTE)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(handle: BinaryIO) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError at once if another open file holds it

    def _unlock(handle: BinaryIO) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
