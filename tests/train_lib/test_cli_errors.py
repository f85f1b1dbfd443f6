"""Bad input through the CLI: one line naming the key or path, a non-zero exit, no traceback, nothing compiled."""
import pytest

from tests.train_lib.conftest import cli_overrides, run_cli


def _error_line(result):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


@pytest.fixture
def run(tmp_path):
    def go(*extra, workdir=None):
        return run_cli(["--config=experiments/gau_lm.py:tiny", f"--workdir={workdir or tmp_path / 'run'}",
                        *cli_overrides(total_steps=1), *extra])
    return go


@pytest.mark.parametrize("args, expected", [
    (["--config.model.num_layerz=3"], ["num_layerz", "num_layers"]),  # misspelled key, with a suggestion
    (["--config.batch_sise=3"], ["batch_sise"]),
    (["--config.batch_size=abc"], ["batch_size", "abc"]),  # wrong type
    (["--config.mesh.data=3", "--config.mesh.fsdp=1"], ["mesh", "3", "8"]),  # 3 devices requested, 8 present
    (["--config.batch_size=12"], ["batch_size", "12", "8"]),  # not divisible by 8 data-parallel devices
    (["--config.data.path=/nonexistent/corpus.txt"], ["data.path", "/nonexistent/corpus.txt", "does not exist"]),
    (["--config.model.normalizer=relu3"], ["model.normalizer", "relu3", "softmax"]),
    (["--config.grad_accum_steps=0"], ["grad_accum_steps", "positive"]),
])
def test_bad_config_values(run, args, expected):
    line = _error_line(run(*args))
    for word in expected:
        assert word in line, line


def test_data_path_without_text(run, tmp_path):
    empty = tmp_path / "binary"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(bytes(range(256)) * 64)
    line = _error_line(run(f"--config.data.path={empty}"))
    assert "data.path" in line and str(empty) in line and "no usable text" in line


def test_unwritable_workdir(run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _error_line(run(workdir=blocker / "run"))
    assert "workdir" in line and str(blocker / "run") in line


def test_missing_config_file(tmp_path):
    line = _error_line(run_cli(["--config=experiments/no_such_experiment.py", f"--workdir={tmp_path}"]))
    assert "no_such_experiment.py" in line


def test_unknown_variant(tmp_path):
    line = _error_line(run_cli(["--config=experiments/gau_lm.py:huge", f"--workdir={tmp_path}"]))
    assert "huge" in line and "tiny" in line
