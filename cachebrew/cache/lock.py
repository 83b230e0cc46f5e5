"""A lock file that makes one export the only writer of a cache directory.

Created with O_EXCL (atomic on local filesystems and NFSv3+), it records who holds it. A second export
stops with an error naming the holder; a lock left by a process that died on this host is taken over,
so a crash never needs manual cleanup on the machine that crashed.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import CachebrewError

logger = logging.getLogger("cachebrew")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    def __init__(self, directory, name: str = ".lock"):
        self.path = Path(directory) / name
        self.held = False

    def acquire(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    logger.warning("%s: taking over the lock of process %d, which no longer runs",
                                   self.path.parent, holder["pid"])
                    self.path.unlink(missing_ok=True)
                    continue
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise CachebrewError(
                    f"{self.path.parent} is being written by another export (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, since {when}). Wait for it, or use another output directory; "
                    f"if that process is gone, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise CachebrewError(f"{self.path}: could not take the lock")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: treat as held by an unknown process

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
