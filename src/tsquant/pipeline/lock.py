"""One tsquant process per run folder: an exclusive lock held while stages run.

The lock is an flock on ``<run>/.lock``: the kernel releases it when the holder exits, however
it exits (kill -9 included), so a stale lock from a killed process never blocks a new run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .config import ConfigError


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fh = None
        self._created_dir = False

    def __enter__(self) -> RunLock:
        self._created_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")  # noqa: SIM115 (held for the lock's lifetime)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the run folder {self.run_dir} ({exc.strerror}): choose an "
                "out_dir you can write to"
            ) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ConfigError(
                f"{self.run_dir} is in use by another tsquant run ({holder}): wait for it to "
                "finish, or give this run another name (--set name=...)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is None:
            return
        # a run that failed before writing anything leaves no folder behind
        if self._created_dir and [p.name for p in self.run_dir.iterdir()] == [".lock"]:
            self.path.unlink(missing_ok=True)
            self.run_dir.rmdir()
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
