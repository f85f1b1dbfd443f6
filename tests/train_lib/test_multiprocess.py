"""Several hosts for real: two processes on 127.0.0.1 with gloo CPU collectives, 2 fake devices each."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker

from tests.train_lib.conftest import REPO, cli_overrides, read_metrics, run_cli

ARGS = ["--config=experiments/gau_lm.py:tiny", "--config.mesh.data=4"]


def _start(workdir, process_id, port, *extra, total):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "train_lib.main", *ARGS, f"--workdir={workdir}",
            *cli_overrides(total_steps=total), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={process_id}", *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(workdir):
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


def test_two_processes_match_one_process_and_their_checkpoint_restores_in_one(tmp_path):
    port = portpicker.pick_unused_port()
    procs = [_start(tmp_path / "two", i, port, "--stop_at_step=6", total=9) for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    one = run_cli([*ARGS, f"--workdir={tmp_path / 'one'}", *cli_overrides(total_steps=9)], devices=4)
    assert one.returncode == 0, one.stderr[-3000:]
    two, single = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in range(1, 7)], [single[s] for s in range(1, 7)], rtol=1e-5)

    # The two processes' checkpoint (step 6) continues in one process with 4 devices, like the 1-process run.
    resumed = run_cli([*ARGS, f"--workdir={tmp_path / 'two'}", *cli_overrides(total_steps=9)], devices=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 6" in resumed.stderr
    after = _losses(tmp_path / "two")
    np.testing.assert_allclose([after[s] for s in range(7, 10)], [single[s] for s in range(7, 10)], rtol=1e-5)


def test_survivor_exits_with_error_when_the_other_process_dies(tmp_path):
    port = portpicker.pick_unused_port()
    procs = [_start(tmp_path / "run", i, port, "--heartbeat_timeout=10", "--config.checkpoint_every_steps=1000",
                    total=100_000) for i in range(2)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=120)  # bounded: heartbeat timeout + shutdown, never a hang
    assert procs[0].returncode != 0
    assert time.time() - killed_at < 90
    assert "another task died" in err or "unhealthy" in err or "error" in err.lower(), err[-3000:]
