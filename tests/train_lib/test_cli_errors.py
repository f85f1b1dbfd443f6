"""Bad input through the CLI: one line naming the key or path, a non-zero exit, no traceback, nothing compiled."""
import pytest

from tests.train_lib.conftest import REPO, cli_overrides, run_cli


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
                        *cli_overrides(total_steps=2), *extra])
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


# --------------------------------------------------------------------------------------------------
# Every CLI, each flag at a bad value: one line, a non-zero exit, no traceback.
# --------------------------------------------------------------------------------------------------
FIXTURES = REPO / "tests" / "fixtures"
LM_RUN, DIFFUSION_RUN = FIXTURES / "lm_workdir_2b2d81e", FIXTURES / "diffusion_workdir_2b2d81e"
TINY = ["--config=experiments/gau_lm.py:tiny"]


def _workdir(tmp_path, source, edit):
    """A copy of a fixture workdir with its config.json edited: `edit(text) -> text`."""
    import shutil
    target = tmp_path / f"edited_{source.name}"
    shutil.copytree(source, target)
    (target / "config.json").write_text(edit((target / "config.json").read_text()))
    return target


def _as_mlm(text):
    import json
    values = json.loads(text)
    values["task"] = "mlm"
    return json.dumps(values)


def _without_optimizer(text):
    import json
    values = json.loads(text)
    del values["optimizer"]
    return json.dumps(values)


SWEEP = [  # (module, args (callable of tmp_path for workdirs), words the line must contain)
    ("train_lib.main", lambda t: [*TINY, f"--workdir={t}", "--stop_at_step=0"], ["--stop_at_step", "positive"]),
    ("train_lib.main", lambda t: ["--config=experiments", f"--workdir={t}"], ["is a directory", "gau_lm.py"]),
    ("train_lib.main", lambda t: [*TINY, f"--workdir={t}", "--config.logical_axis_rules=3"],
     ["'logical_axis_rules'", "pairs"]),
    ("train_lib.main", lambda t: [*TINY, f"--workdir={t}", "--config.optimizer.learning_rate=-1"],
     ["'optimizer.learning_rate'", "positive finite"]),
    ("train_lib.main", lambda t: [*TINY, f"--workdir={t}", "--config.optimizer.warmup_steps=5000"],
     ["'optimizer.warmup_steps' 5000", "total_steps (1000)"]),
    ("train_lib.main", lambda t: [*TINY, f"--workdir={t}", "--config.optimizer.name=sgd"],
     ["optimizer.momentum", "tiny,sgd"]),
    ("train_lib.main", lambda t: [*TINY, f"--workdir={t}", "--config.data.seq_len=16384", "--config.batch_size=8",
                                  "--config.model.position=none", "--config.eval_batches=1"],
     ["the train step needs an estimated", "GiB per device", "data.seq_len"]),
    ("train_lib.generate", lambda t: ["--workdir", str(LM_RUN), "--top_k=1000"], ["--top_k 1000", "256"]),
    ("train_lib.lm.generate", lambda t: ["--workdir", str(LM_RUN), "--max_new_tokens=0"], ["--max_new_tokens"]),
    ("train_lib.lm.generate", lambda t: ["--workdir", str(t / "nowhere")], ["is not a directory"]),
    ("train_lib.lm.generate", lambda t: ["--workdir", str(_workdir(t, LM_RUN, lambda s: s[:40]))],
     ["config.json", "is not valid JSON"]),
    ("train_lib.lm.generate", lambda t: ["--workdir", str(_workdir(t, LM_RUN, _without_optimizer))],
     ["config.json", "lacks or mistypes a key"]),
    ("train_lib.lm.generate", lambda t: ["--workdir", str(_workdir(t, LM_RUN, _as_mlm))],
     ["masked language model", "cannot continue text", "train_lib.lm.evaluate"]),
    ("train_lib.lm.generate", lambda t: ["--workdir", str(DIFFUSION_RUN)],
     ["diffusion model of images", "python -m train_lib.diffusion.sample"]),
    ("train_lib.lm.evaluate", lambda t: ["--workdir", str(DIFFUSION_RUN), "--lengths=16"],
     ["diffusion model of images", "python -m train_lib.diffusion.sample"]),
    ("train_lib.lm.evaluate", lambda t: ["--workdir", str(LM_RUN), "--lengths=0"], ["--lengths", "positive"]),
    ("train_lib.lm.evaluate", lambda t: ["--workdir", str(LM_RUN), "--lengths=16,x"], ["--lengths", "integers"]),
    ("train_lib.evaluate", lambda t: ["--workdir", str(LM_RUN), "--lengths=400000"],
     ["--lengths: evaluating at length 400000", "needs an estimated", "per device"]),
    ("train_lib.lm.evaluate", lambda t: ["--workdir", str(LM_RUN), "--lengths=4000000"], ["shorter than 4000000"]),
    ("train_lib.diffusion.sample", lambda t: ["--workdir", str(DIFFUSION_RUN), "--steps=0"],
     ["--steps", "1..100", "[0]"]),
    ("train_lib.sample", lambda t: ["--workdir", str(DIFFUSION_RUN), "--num=0"], ["--num must be positive"]),
    ("train_lib.diffusion.sample", lambda t: ["--workdir", str(DIFFUSION_RUN), "--sampler=euler"], ["'euler'"]),
    ("train_lib.diffusion.sample", lambda t: ["--workdir", str(DIFFUSION_RUN), "--second_last_sigma_pixels=-1"],
     ["--second_last_sigma_pixels", "non-negative"]),
    ("train_lib.diffusion.sample", lambda t: ["--workdir", str(LM_RUN)],
     ["byte-level causal language model", "train_lib.lm.generate"]),
    ("train_lib.text.generate", lambda t: ["--workdir", str(LM_RUN), "--input=x"],
     ["byte-level causal language model", "train_lib.lm.generate"]),
    ("train_lib.text.generate", lambda t: ["--workdir", str(t), "--input=x", "--beam_size=0"],
     ["--beam_size must be at least 1"]),
    ("train_lib.text.evaluate", lambda t: ["--workdir", str(t), "--split=dev"], ["--split", "validation"]),
    ("train_lib.benchmark", lambda t: [*TINY, "--steps=0"], ["--steps"]),
    ("train_lib.benchmark", lambda t: [*TINY, "--ab=model.num_layerz=1"], ["--ab", "num_layerz"]),
    ("experiments.length_generalization", lambda t: ["--config.models=('relu3',)"], ["'models'", "softmax"]),
    ("experiments.length_generalization", lambda t: ["--config.lengths=(0, 64)"], ["'lengths'", "positive"]),
    ("experiments.position_probe", lambda t: ["--config.probez=1"], ["probez"]),
    ("experiments.position_probe", lambda t: ["--config.steps=0"], ["'steps'", "positive"]),
    ("experiments.flash_speed", lambda t: ["--config.models=('gau', 'rnn')"], ["'models'", "flash"]),
    ("experiments.zlpr_vs_bce", lambda t: ["--config.losses=('mse',)"], ["'losses'", "zlpr"]),
    ("train_lib.text.continuation", lambda t: ["--workdir", str(t), "--k=0"], ["--k", "at least 1"]),
    ("experiments.continuation", lambda t: ["--config.models=('gpt',)"], ["'models'", "sampled"]),
]


@pytest.mark.parametrize("module, args, words", SWEEP, ids=[f"{m}:{i}" for i, (m, _, _) in enumerate(SWEEP)])
def test_every_cli_gives_one_line_for_a_bad_value(tmp_path, module, args, words):
    line = _error_line(run_cli(args(tmp_path), module=module, devices=1))
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("module, flag", [
    ("train_lib.main", "--stop_at_step"), ("train_lib.lm.generate", "--top_k"), ("train_lib.lm.evaluate", "--lengths"),
    ("train_lib.diffusion.sample", "--second_last_sigma_pixels"), ("train_lib.benchmark", "--compile_only"),
    ("experiments.position_probe", "--config"), ("train_lib.text.generate", "--beam_size"),
    ("train_lib.text.evaluate", "--split"), ("train_lib.text.continuation", "--max_chars"),
])
def test_help_prints_the_flags(module, flag):
    result = run_cli(["--help"], module=module, devices=1)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"  {flag}: " in result.stdout and "--config.KEY=VALUE" in result.stdout  # the command's own flags
    assert "--verbosity" not in result.stdout  # absl's logging flags left out


def test_experiment_files_resolve_from_any_directory(tmp_path):
    """`--config=experiments/NAME.py` names the installed experiments when the working directory has none;
    an override's mistake is then one line too (it was a 40-line traceback)."""
    line = _error_line(run_cli([*TINY, f"--workdir={tmp_path / 'run'}", "--config.total_steps=-1"], cwd=tmp_path))
    assert "'total_steps' must be a positive integer, got -1" in line
    line = _error_line(run_cli(["--config=experiments/nope.py:tiny", f"--workdir={tmp_path}", "--config.seed=1"],
                               cwd=tmp_path))
    assert "'experiments/nope.py' does not exist" in line and "gau_lm.py" in line


@pytest.mark.parametrize("source, words", [
    ("def get_config(arg=None)\n    return 1\n", ["line 1: SyntaxError"]),
    ("def get_config(arg=None):\n    return undefined\n", ["line 2: NameError", "undefined"]),
    ("CONFIG = {}\n", ["defines no get_config(arg) function"]),
    ("def get_config(arg=None):\n    raise ValueError('unknown variant ' + repr(arg))\n", ["unknown variant 'x'"]),
])
def test_broken_experiment_files_give_one_line(tmp_path, source, words):
    path = tmp_path / "broken.py"
    path.write_text(source)
    line = _error_line(run_cli([f"--config={path}:x", f"--workdir={tmp_path / 'run'}"], devices=1))
    for word in words:
        assert word in line and str(path) in line, line
