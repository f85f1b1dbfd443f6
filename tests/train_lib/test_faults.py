"""Faults injected for real, through the CLI: preemption signals and damaged checkpoints.

Each test checks that no step of training is lost or changed: the losses after recovery equal an
uninterrupted run's, step by step.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train_lib.conftest import REPO, cli_overrides, make_config, read_metrics, run_cli
from train_lib import trainer

LONG = 100_000  # total_steps for runs that are interrupted: the schedule is the same whatever the stop step


def _losses(workdir):
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


def _steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _start_cli(workdir, *extra, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "train_lib.main", "--config=experiments/gau_lm.py:tiny", f"--workdir={workdir}",
            *cli_overrides(total_steps=LONG, checkpoint_every_steps=1000), *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, process, timeout=240):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()[1][-3000:]}")
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line):
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError("training did not reach step %d in time" % step)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_current_step_exits_zero_and_resumes_exactly(tmp_path, sig):
    workdir = tmp_path / "preempted"
    process = _start_cli(workdir)
    _wait_for_step(workdir, 3, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    stopped = _steps(workdir)[-1]
    assert stopped >= 3 and "rerun the same command" in stderr
    assert max(_losses(workdir)) == stopped  # every step trained was checkpointed: nothing lost

    resumed = run_cli(["--config=experiments/gau_lm.py:tiny", f"--workdir={workdir}", f"--stop_at_step={stopped + 3}",
                       *cli_overrides(total_steps=LONG, checkpoint_every_steps=1000)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trainer.train_and_evaluate(make_config(total_steps=LONG, checkpoint_every_steps=1000), str(tmp_path / "reference"),
                               stop_at_step=stopped + 3)
    assert _losses(workdir) == _losses(tmp_path / "reference")


def _train(workdir, total, **overrides):
    return run_cli(["--config=experiments/gau_lm.py:tiny", f"--workdir={workdir}",
                    *cli_overrides(total_steps=total, **overrides)])


def _damage(step_dir: pathlib.Path, how: str):
    if how == "data":  # the data position (grain's iterator state, JSON) cut short
        (step_dir / "data" / "metadata").write_text('{"next_in')
        return
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
                   key=lambda p: p.stat().st_size)
    assert files, list(step_dir.rglob("*"))
    if how == "truncate":
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        for f in files:
            f.unlink()


@pytest.mark.parametrize("how", ["truncate", "delete", "data"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, how):
    workdir = tmp_path / "run"
    first = _train(workdir, 12, checkpoint_every_steps=3)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = _losses(workdir)
    assert _steps(workdir) == [6, 9, 12]
    _damage(workdir / "checkpoints" / "12", how)
    _damage(workdir / "checkpoints" / "9", how)

    again = _train(workdir, 12, checkpoint_every_steps=3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoints/12 is damaged" in again.stderr and "checkpoints/9 is damaged" in again.stderr
    assert "resuming at step 6" in again.stderr
    assert _losses(workdir) == reference  # steps 7..12 retrained to the same values
    assert len(list((workdir / "damaged_checkpoints").iterdir())) == 2


def test_no_usable_checkpoint_stops_unless_config_allows_fresh_start(tmp_path):
    workdir = tmp_path / "run"
    assert _train(workdir, 6, checkpoint_every_steps=3).returncode == 0
    for step in _steps(workdir):
        _damage(workdir / "checkpoints" / str(step), "delete")
    stopped = _train(workdir, 6, checkpoint_every_steps=3)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert "none of the checkpoints [6, 3]" in stopped.stderr and "start_fresh_if_checkpoints_unusable" in stopped.stderr
    fresh = _train(workdir, 6, checkpoint_every_steps=3, start_fresh_if_checkpoints_unusable=True)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "starting at step 0" in fresh.stderr and _steps(workdir) == [3, 6]
    np.testing.assert_array_less(0, len(_losses(workdir)))


def test_resuming_with_another_models_config_is_refused_and_changes_nothing(tmp_path):
    """Checkpoints of another layer layout are not "damaged": the run stops with one line naming the
    difference, the checkpoints stay where they are, and the workdir still describes its own run."""
    workdir = tmp_path / "run"
    assert _train(workdir, 6, checkpoint_every_steps=3).returncode == 0
    config_json = (workdir / "config.json").read_text()
    cases = [  # (override, expected in the message): start_fresh_if_checkpoints_unusable must not train over them
        ({"model.scan_layers": True}, "not in the config's model (e.g. ema_params/layer_0/"),
        ({"model.embed_dim": 48, "start_fresh_if_checkpoints_unusable": True},
         "have another shape (e.g. ema_params/embed/embedding: (256, 32) saved, (256, 48) wanted"),
        ({"ema_decay": 0.0}, "written with another ema_decay"),
    ]
    for override, expected in cases:
        refused = _train(workdir, 9, checkpoint_every_steps=3, **override)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        message = refused.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: checkpoint {workdir / 'checkpoints' / '6'} does not fit the config")
        assert expected in message and message.endswith("nothing was moved or changed."), message
        assert str(workdir / "config.json") in message
        assert _steps(workdir) == [3, 6] and not (workdir / "damaged_checkpoints").exists()
        assert (workdir / "config.json").read_text() == config_json
    resumed = _train(workdir, 9, checkpoint_every_steps=3)
    assert resumed.returncode == 0 and "resuming at step 6" in resumed.stderr


def test_checkpoint_restores_onto_other_topologies_and_training_continues(tmp_path):
    """Saved on a 2×2×2 mesh of 8 devices; continued on a (4, 1, 2) mesh and on 1 device."""
    mesh = dict(mesh__data=2, mesh__fsdp=2, mesh__model=2)
    trainer.train_and_evaluate(make_config(**mesh), str(tmp_path / "reference"))
    trainer.train_and_evaluate(make_config(**mesh), str(tmp_path / "saved"), stop_at_step=6)
    for name in ("mesh412", "single"):
        import shutil
        shutil.copytree(tmp_path / "saved", tmp_path / name)
    trainer.train_and_evaluate(make_config(mesh__data=4, mesh__fsdp=1, mesh__model=2), str(tmp_path / "mesh412"))
    single = run_cli(["--config=experiments/gau_lm.py:tiny", f"--workdir={tmp_path / 'single'}", *cli_overrides()],
                     devices=1)
    assert single.returncode == 0, single.stderr[-3000:]
    reference = _losses(tmp_path / "reference")
    for name in ("mesh412", "single"):
        continued = _losses(tmp_path / name)
        assert sorted(continued) == list(range(1, 13))
        np.testing.assert_allclose([continued[s] for s in range(7, 13)], [reference[s] for s in range(7, 13)],
                                   rtol=2e-5)


def test_nonfinite_step_can_be_skipped_by_config(tmp_path):
    trainer.train_and_evaluate(make_config(total_steps=6, debug__nan_at_step=2, skip_nonfinite_steps=True),
                               str(tmp_path / "skip"))
    rows = {row["step"]: row for row in read_metrics(tmp_path / "skip")}
    assert rows[3]["nonfinite"] == 1.0 and rows[3]["loss"] is None  # NaN is written as null
    assert all(rows[s]["nonfinite"] == 0.0 and np.isfinite(rows[s]["loss"]) for s in (1, 2, 4, 5, 6))
    assert _steps(tmp_path / "skip") == [3, 6]


def test_disk_full_while_saving_gives_clear_error_and_keeps_previous_checkpoint(tmp_path):
    """A file-size limit makes every write past it fail, as a full disk does (EFBIG instead of ENOSPC)."""
    workdir = tmp_path / "run"
    assert _train(workdir, 6, checkpoint_every_steps=3).returncode == 0  # checkpoints 3 and 6
    limit = 16 * 1024  # smaller than one checkpoint's data file, larger than the metrics rows
    # The limit is set by a tiny launcher that then execs the trainer (no preexec_fn: forking a
    # multithreaded JAX process is unsafe).
    launcher = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); "
                "os.execv(sys.executable, [sys.executable] + sys.argv[1:])" % (limit, limit))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    full = subprocess.run([sys.executable, "-c", launcher, "-m", "train_lib.main", "--config=experiments/gau_lm.py:tiny",
                           f"--workdir={workdir}", *cli_overrides(total_steps=12, checkpoint_every_steps=3)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr[-3000:]
    error = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert error and "writing a checkpoint" in error[-1] and "are untouched" in error[-1], full.stderr[-3000:]
    # (TensorStore's write threads may still print 'Event loop is closed' tracebacks; the error line is ours.)
    # The previous checkpoint is intact: a normal restart resumes from it and finishes.
    again = _train(workdir, 12, checkpoint_every_steps=3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 6" in again.stderr and "damaged" not in again.stderr


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path):
    """SIGKILL at random points (often inside an asynchronous checkpoint write, saved every 2 steps);
    each restart resumes from the newest complete checkpoint and the final losses equal an uninterrupted run's."""
    rng = np.random.default_rng(0)
    workdir, total = tmp_path / "killed", 60
    overrides = dict(total_steps=total, checkpoint_every_steps=2)
    kills = 0
    for _ in range(6):
        process = _start_cli(workdir, *cli_overrides(**overrides))
        try:
            _wait_for_step(workdir, (max(_steps(workdir)) if (workdir / "checkpoints").exists() and _steps(workdir)
                                     else 0) + 1, process)
        except AssertionError:
            break  # finished before it could be killed
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is None:
            process.kill()
            kills += 1
        process.communicate()
    assert kills >= 3
    final = run_cli(["--config=experiments/gau_lm.py:tiny", f"--workdir={workdir}", *cli_overrides(**overrides)])
    assert final.returncode == 0, final.stderr[-3000:]
    trainer.train_and_evaluate(make_config(**overrides), str(tmp_path / "reference"))
    assert _losses(workdir) == _losses(tmp_path / "reference")


@pytest.mark.parametrize("error", [
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.00GiB."),
    OSError(5, "Input/output error"),  # EIO: a storage hiccup
], ids=["out_of_memory", "transient_storage_error"])
def test_a_restore_failing_for_another_reason_stops_and_moves_nothing(tmp_path, monkeypatch, error):
    """Only checkpoints shown to be damaged are moved aside: here the files read back whole, so the run stops
    with the error and the next start, once the cause is gone, resumes from the same checkpoint."""
    from train_lib import checkpointing

    config = lambda: make_config(total_steps=9, checkpoint_every_steps=3)  # noqa: E731
    trainer.train_and_evaluate(config(), str(tmp_path), stop_at_step=6)
    attempts = []

    def failing(self, step, abstract_state, with_data):
        attempts.append(step)
        raise error
    monkeypatch.setattr(checkpointing.Checkpointer, "_restore_items", failing)
    with pytest.raises(checkpointing.CheckpointRestoreError) as info:
        trainer.train_and_evaluate(config(), str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"restoring checkpoint {tmp_path / 'checkpoints' / '6'} failed ({type(error).__name__}: ")
    assert str(error) in message and "its files read back whole, so it is not damaged, and it was left in place" in message
    assert attempts == [6] and _steps(tmp_path) == [3, 6] and not (tmp_path / "damaged_checkpoints").exists()
    monkeypatch.undo()
    result = trainer.train_and_evaluate(config(), str(tmp_path))
    assert result["step"] == 9 and sorted(_losses(tmp_path)) == list(range(1, 10))


# When a read of a damaged checkpoint fails, TensorStore's other reads still finish on threads whose asyncio
# loop Orbax has closed ("Event loop is closed"; train_lib.checkpointing filters them from the CLIs' stderr).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damage_evidence_reads_the_files_back():
    """The evidence comes from reading the checkpoint's files, not from the failed restore's exception."""
    import shutil
    import tempfile

    from train_lib import checkpointing

    workdir = pathlib.Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "lm_workdir_2b2d81e", workdir)
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", keep=3)
    try:
        assert checkpointer.damage_evidence(2, budget_bytes=1) == (None, None)  # intact, read one array at a time
        (workdir / "checkpoints" / "2" / "data" / "metadata").write_text('{"next_ind')  # the data position cut short
        evidence, _ = checkpointer.damage_evidence(2)
        assert evidence and "JSONDecodeError" in evidence, evidence
        assert checkpointer.damage_evidence(2, with_data=False) == (None, None)
        _damage(workdir / "checkpoints" / "2", "truncate")
        evidence, read_back_error = checkpointer.damage_evidence(2, with_data=False)
        assert evidence and read_back_error is None  # truncated array files: metadata or data unreadable
    finally:
        checkpointer.close()
        shutil.rmtree(workdir.parent)
