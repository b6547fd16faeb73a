"""modules.call_queue: the generation lock (a FIFOLock in the webui; not reentrant)."""

import threading

from modules import calls


class RecordingLock:
    def __init__(self):
        self._lock = threading.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self):
        self._lock.acquire()
        calls.append("lock.acquire")
        return True

    def __exit__(self, *exc):
        calls.append("lock.release")
        self._lock.release()


queue_lock = RecordingLock()
