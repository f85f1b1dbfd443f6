"""One run per workdir: a live holder refuses a second run in one line; a dead one's lock is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.train_lib.conftest import cli_overrides, make_config, run_cli
from train_lib import trainer, workdir_lock
from train_lib.workdir_lock import WorkdirBusyError, WorkdirLock


def _hold(workdir, pid, host=None, age=0.0):
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / workdir_lock.LOCK_NAME
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "start_ticks": None,
                                "started": "2026-12-01T10:00:00+00:00"}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_live_holder_refuses_a_second_run_and_nothing_is_written(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(tmp_path, holder.pid)
        with pytest.raises(WorkdirBusyError, match=rf"in use by the run started 2026-12-01T10:00:00\+00:00 on host "
                                                   rf"{socket.gethostname()} \(pid {holder.pid}\)"):
            trainer.train_and_evaluate(make_config(total_steps=2), str(tmp_path))
        # no config, metrics or checkpoints: only the lock and the guard file starting runs take turns on
        assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.LOCK_NAME, workdir_lock.LOCK_NAME + ".guard"]
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = _hold(tmp_path, dead.pid)
    with caplog.at_level("WARNING"):
        trainer.train_and_evaluate(make_config(total_steps=2), str(tmp_path))
    assert f"from pid {dead.pid}" in caplog.text and "that process no longer runs" in caplog.text
    assert not path.exists() and (tmp_path / "checkpoints" / "2").is_dir()


def test_a_lock_file_that_names_no_process_is_taken_over(tmp_path, caplog):
    for text in ("[]", '{"pid": "x", "host": 3}'):
        (tmp_path / workdir_lock.LOCK_NAME).write_text(text)
        lock = WorkdirLock(tmp_path)
        with caplog.at_level("WARNING"):
            lock.acquire()
        assert "does not name a process" in caplog.text
        lock.release()


def test_another_hosts_lock_is_stale_only_when_not_refreshed(tmp_path):
    _hold(tmp_path, 1, host="elsewhere", age=10.0)
    with pytest.raises(WorkdirBusyError, match="on host elsewhere"):
        WorkdirLock(tmp_path).acquire()
    _hold(tmp_path, 1, host="elsewhere", age=workdir_lock.STALE_SECONDS + 5)
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_a_second_cli_run_on_a_busy_workdir_stops_in_one_line(tmp_path):
    from tests.train_lib.test_faults import _start_cli, _wait_for_step
    workdir = tmp_path / "busy"
    first = _start_cli(workdir)
    try:
        _wait_for_step(workdir, 1, first)
        second = run_cli(["--config=experiments/gau_lm.py:tiny", f"--workdir={workdir}",
                          *cli_overrides(total_steps=4)])
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert lines[-1].startswith(f"error: --workdir: {str(workdir)!r} is in use by the run started ")
        assert f"(pid {first.pid})" in lines[-1]
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert first.returncode == 0  # the first run was not disturbed: it checkpointed and stopped on SIGTERM
