"""One run per workdir: `<workdir>/run.lock`, held by process 0 for the life of a run.

Two runs on one workdir would interleave their metrics, mix their checkpoints and overwrite each
other's config.json. The lock file is created atomically (O_EXCL) and names the holder (host, PID, start
time); the holder refreshes its modification time every `HEARTBEAT_SECONDS`. A second run stops with one
line naming the holder, unless the lock is stale: its process is gone (same host), or it has not been
refreshed for `STALE_SECONDS` (another host, e.g. a preempted VM sharing the storage). A stale lock is
taken over with a warning, so a run killed by SIGKILL never blocks its own restart.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time

from train_lib.config_lib import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
LOCK_NAME = "run.lock"


class WorkdirBusyError(ConfigError):
    """Another live run holds the workdir."""


def _process_start_ticks(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    current = _process_start_ticks(pid)
    return start_ticks is None or current is None or current == start_ticks


class WorkdirLock:
    """Context manager over `<workdir>/run.lock` (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(),
                       "start_ticks": _process_start_ticks(os.getpid()),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        # The check-and-take-over of a stale lock is one critical section among starting runs (flock on a
        # guard file beside it), so two runs that both find a lock stale cannot both take it.
        with open(self.path.with_name(LOCK_NAME + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                self._acquire()
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def _acquire(self) -> None:
        for _ in range(3):  # a lock being written right now is read again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:
                    continue
                reason = self._stale_reason(holder)
                if reason is None:
                    raise WorkdirBusyError(
                        f"--workdir: {str(self.path.parent)!r} is in use by the run started {holder.get('started')} "
                        f"on host {holder.get('host')} (pid {holder.get('pid')}), which holds {self.path}; wait "
                        "for it to finish or use another --workdir")
                log.warning("taking over %s from pid %s on host %s: %s", self.path, holder.get("pid"),
                            holder.get("host"), reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._owner) + "\n")
            self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
            self._thread.start()
            return
        raise WorkdirBusyError(f"--workdir: could not take {self.path}: other runs keep starting on this workdir")

    def _read_holder(self) -> dict | None:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:  # being written right now, or cut short by a crash
            holder = {} if age > 5.0 else None
            if holder is None:
                time.sleep(0.5)
                return None
        if not isinstance(holder, dict):
            holder = {}
        return {**holder, "age": age}

    def _stale_reason(self, holder: dict) -> str | None:
        if not isinstance(holder.get("pid"), int) or not isinstance(holder.get("host"), str):
            return "the lock file does not name a process"
        if holder.get("host") == self._owner["host"]:
            if not _alive(int(holder["pid"]), holder.get("start_ticks")):
                return "that process no longer runs"
            return None
        if holder["age"] > STALE_SECONDS:
            return f"not refreshed for {holder['age']:.0f} s"
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if json.loads(self.path.read_text()).get("pid") != self._owner["pid"]:
                    log.warning("%s was taken over by another run; this run no longer holds it", self.path)
                    return
                os.utime(self.path)
            except (OSError, ValueError, AttributeError):
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=5)
        self._thread = None
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if holder.get("pid") == self._owner["pid"] and holder.get("host") == self._owner["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
