"""Several hosts for real: two processes on 127.0.0.1 with gloo CPU collectives, 2 fake devices each."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

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
    assert "--stop_at_step=6: stopped after step 6 of 9 with a checkpoint; rerun the same command" in outputs[0][1]
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


def _start_experiment(workdir, process_id, port, experiment, overrides):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "train_lib.main", f"--config={experiment}", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in overrides.items()], f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={process_id}"]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Both runs reach total_steps, evaluate at the last step (always) and print the end-of-run report, which is
# computed on process 0 from parameters gathered to every host.
FINISHING = {
    "lm": ("experiments/gau_lm.py:tiny", {**{k.replace("__", "."): v for k, v in {
        "total_steps": 6, "batch_size": 8, "log_every_steps": 1, "eval_every_steps": 3, "eval_batches": 2,
        "checkpoint_every_steps": 3, "final_sample_tokens": 16, "data.seq_len": 32, "model.num_layers": 2,
        "model.embed_dim": 32, "model.key_dim": 16, "optimizer.warmup_steps": 2}.items()}, "mesh.data": 4},
           "Sample (prompt 'def '"),
    "diffusion": ("experiments/ddpm_digits.py:tiny", {"total_steps": 4, "batch_size": 16, "eval_every_steps": 2,
                                                     "eval_batches": 1, "checkpoint_every_steps": 2,
                                                     "optimizer.warmup_steps": 2, "sample.report_samples": 2,
                                                     "diffusion.eval_nll_steps": 2, "mesh.data": 4},
                  "2 samples (DDIM"),
}


@pytest.mark.parametrize("family", ["lm", pytest.param("diffusion", marks=pytest.mark.slow)])  # sampling: slow
def test_a_two_process_run_that_finishes_exits_promptly(tmp_path, family):
    experiment, overrides, report = FINISHING[family]
    port = portpicker.pick_unused_port()
    procs = [_start_experiment(tmp_path, i, port, experiment, overrides) for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    finished = time.time()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    last_row = (tmp_path / "metrics.jsonl").stat().st_mtime
    assert finished - last_row < 30  # not JAX's 5-minute shutdown barrier
    assert report in outputs[0][0] and report not in outputs[1][0]  # process 0 prints the report
    evals = read_metrics(tmp_path, "eval")
    assert evals[-1]["step"] == overrides["total_steps"] and len(evals) == 2
    assert not (tmp_path / "run.lock").exists()


def test_two_processes_agree_to_set_a_damaged_checkpoint_aside(tmp_path):
    from tests.train_lib.test_faults import _damage, _steps
    port = portpicker.pick_unused_port()
    procs = [_start(tmp_path, i, port, "--stop_at_step=6", total=9) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=400) == 0, p.communicate()[1][-3000:]
    assert _steps(tmp_path) == [3, 6]
    _damage(tmp_path / "checkpoints" / "6", "truncate")
    port = portpicker.pick_unused_port()
    procs = [_start(tmp_path, i, port, total=9) for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "resuming at step 3" in err or p is procs[1]
    assert "checkpoints/6 is damaged" in outputs[0][1] and len(list((tmp_path / "damaged_checkpoints").iterdir())) == 1
    assert sorted(_losses(tmp_path)) == list(range(1, 10))


def test_a_restore_failing_on_one_process_stops_both_and_moves_nothing(tmp_path):
    """The processes agree on one outcome: process 1's (injected) out-of-memory error stops both, promptly,
    although process 0 restored the checkpoint; nothing is moved."""
    from tests.train_lib.test_faults import _steps
    port = portpicker.pick_unused_port()
    procs = [_start(tmp_path, i, port, "--stop_at_step=3", total=9) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=400) == 0, p.communicate()[1][-3000:]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    port = portpicker.pick_unused_port()
    launcher = str(REPO / "tests" / "train_lib" / "restore_failure_launcher.py")
    procs = [subprocess.Popen([sys.executable, launcher, "1", *ARGS, f"--workdir={tmp_path}",
                               *cli_overrides(total_steps=9), f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    start = time.time()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert time.time() - start < 120
    assert [p.returncode for p in procs] == [1, 1], [err[-2000:] for _, err in outputs]
    last = [err.strip().splitlines()[-1] for _, err in outputs]
    assert last[1].startswith(f"error: restoring checkpoint {tmp_path / 'checkpoints' / '3'} failed (RuntimeError: "
                              "RESOURCE_EXHAUSTED: out of memory (injected on process 1))")
    assert "failed on another process" in last[0] and "left in place" in last[0]
    assert _steps(tmp_path) == [3] and not (tmp_path / "damaged_checkpoints").exists()
