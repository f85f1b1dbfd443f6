"""End-to-end behaviour of the trainer on a very small GAU LM (8 fake CPU devices)."""
import numpy as np
import pytest

from tests.train_lib.conftest import cli_overrides, make_config, read_metrics, run_cli
from train_lib import trainer


def _losses(workdir):
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


def test_training_loss_falls(tmp_path):
    config = make_config(total_steps=40, eval_every_steps=40, optimizer__learning_rate=3e-3)
    result = trainer.train_and_evaluate(config, str(tmp_path))
    losses = [_losses(tmp_path)[s] for s in range(1, 41)]
    assert np.mean(losses[:3]) > 5.0  # ≈ ln 256 = 5.55 at initialisation
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.5
    assert result["eval"]["loss"] < 4.0 and result["eval"]["bits_per_byte"] == pytest.approx(
        result["eval"]["loss"] / np.log(2))
    assert {"learning_rate", "grad_norm", "tokens_per_sec"} <= set(read_metrics(tmp_path)[-1])
    assert {"loss", "accuracy", "bits_per_byte", "ema_loss"} <= set(read_metrics(tmp_path, "eval")[-1])
    import matplotlib.image
    curves = matplotlib.image.imread(tmp_path / "curves.png")  # train loss and one panel per eval metric
    assert curves.shape[1] > 3 * curves.shape[0] and curves[..., :3].std() > 0.05


def test_stop_and_resume_equals_uninterrupted_run_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    trainer.train_and_evaluate(make_config(eval_every_steps=12), str(full))
    first = trainer.train_and_evaluate(make_config(eval_every_steps=12), str(resumed), stop_at_step=6)
    assert first["step"] == 6 and (resumed / "checkpoints" / "6").is_dir()
    trainer.train_and_evaluate(make_config(eval_every_steps=12), str(resumed))
    assert list(_losses(full)) == list(range(1, 13))
    assert _losses(resumed) == _losses(full)  # bit for bit: same data position, RNG and optimizer state
    assert read_metrics(resumed, "eval") == read_metrics(full, "eval")


def test_a_checkpoint_past_total_steps_is_one_line_and_kept(tmp_path):
    from train_lib.config_lib import ConfigError

    trainer.train_and_evaluate(make_config(total_steps=4, eval_every_steps=4), str(tmp_path))
    with pytest.raises(ConfigError, match=r"holds a checkpoint at step 4, past this config's total_steps=2"):
        trainer.train_and_evaluate(make_config(total_steps=2, eval_every_steps=2), str(tmp_path))
    assert (tmp_path / "checkpoints" / "4").is_dir()


def test_gradient_accumulation_equals_large_batch(tmp_path):
    trainer.train_and_evaluate(make_config(total_steps=4, batch_size=32, grad_accum_steps=1), str(tmp_path / "one"))
    trainer.train_and_evaluate(make_config(total_steps=4, batch_size=32, grad_accum_steps=4), str(tmp_path / "four"))
    one, four = _losses(tmp_path / "one"), _losses(tmp_path / "four")
    np.testing.assert_allclose([four[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5)


def test_sharded_mesh_matches_single_device(tmp_path):
    """A (data, fsdp, model) = (2, 2, 2) mesh of 8 devices trains like 1 device, to float tolerance."""
    trainer.train_and_evaluate(make_config(total_steps=5, mesh__data=2, mesh__fsdp=2, mesh__model=2),
                               str(tmp_path / "mesh"))
    single = run_cli(["--config=experiments/gau_lm.py:tiny", f"--workdir={tmp_path / 'single'}",
                      *cli_overrides(total_steps=5)], devices=1)
    assert single.returncode == 0, single.stderr[-2000:]
    mesh, one = _losses(tmp_path / "mesh"), _losses(tmp_path / "single")
    np.testing.assert_allclose([mesh[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=2e-5)


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(trainer.NonFiniteLossError, match="step 5"):
        trainer.train_and_evaluate(make_config(debug__nan_at_step=4), str(tmp_path))  # step index 4 = 5th step
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]


def test_generate_cli_samples_from_checkpoint(tmp_path):
    trainer.train_and_evaluate(make_config(total_steps=3), str(tmp_path))
    out = run_cli(["--workdir", str(tmp_path), "--prompt", "import ", "--max_new_tokens", "20"],
                  module="train_lib.generate", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "# checkpoint step 3" in out.stdout and "\nimport " in out.stdout
