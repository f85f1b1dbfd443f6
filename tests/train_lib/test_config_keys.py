"""No config value is silently ignored: every key of every variant of every experiment is read, and a key
nothing reads is refused before anything compiles."""
import ast
import pathlib
import pickle

import numpy as np
import pytest

from experiments import char_mlm, common, ddpm_digits, gau_lm, review_lm, sentiment, title_generation
from tests.train_lib.conftest import REPO, make_config
from train_lib import config_lib, trainer
from train_lib.config_lib import ConfigError

TRAINABLE = {gau_lm: gau_lm._VARIANTS, ddpm_digits: ddpm_digits._VARIANTS, char_mlm: char_mlm._VARIANTS,
             title_generation: title_generation._VARIANTS, sentiment: sentiment._VARIANTS,
             review_lm: review_lm._VARIANTS}


def _fake_cifar(directory: pathlib.Path) -> str:
    """A directory in CIFAR-10's pickle layout (nothing is read until the data is needed)."""
    directory.mkdir(exist_ok=True)
    for name in ("data_batch_1", "test_batch"):
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, f)
    return str(directory)


def _arguments(module, variants):
    presets = sorted({**common.COMMON_PRESETS, **module._PRESETS})
    return [v for v in variants] + [f"{next(iter(variants))},{p}" for p in presets]


@pytest.mark.parametrize("module", list(TRAINABLE), ids=lambda m: m.__name__)
def test_every_key_of_every_variant_and_preset_is_read(module, tmp_path):
    for arg in _arguments(module, TRAINABLE[module]):
        config = module.get_config(arg)
        if config.data.get("dataset") == "cifar10":
            config.data.path = _fake_cifar(tmp_path / "cifar")
        if config.get("init_from"):  # the pretrained workdir is another experiment's output
            config.init_from = ""
            if config.get("classify", {}).get("lst_cache_features"):  # its cache is computed from init_from
                config.classify.lst_cache_features = False
        try:  # reads every key through a ReadRecorder and refuses unread ones; compiles nothing
            trainer.setup(config, num_devices=8, num_processes=1)
        except ConfigError as e:
            pytest.fail(f"{module.__name__}:{arg}: {e}")


def test_a_key_nothing_reads_is_refused_naming_it():
    config = make_config()
    with config.unlocked():
        config.model.name = "gau_lm"  # what earlier experiment files set and nothing read
        config.optimizer.momentum = 0.9  # AdamW has no momentum
    with pytest.raises(ConfigError, match=r"'model.name', 'optimizer.momentum' are read by nothing"):
        trainer.setup(config)


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.learning_rate", 0.0, "'optimizer.learning_rate' must be a positive finite number"),
    ("optimizer.learning_rate", -1e-3, "'optimizer.learning_rate' must be a positive finite number"),
    ("optimizer.learning_rate", float("nan"), "'optimizer.learning_rate' must be a positive finite number"),
    ("optimizer.learning_rate", float("inf"), "'optimizer.learning_rate' must be a positive finite number"),
    ("optimizer.warmup_steps", 13, "'optimizer.warmup_steps' 13 must be in 0..total_steps (12)"),
    ("optimizer.name", "adam", "'optimizer.name' is 'adam'; expected one of ['adafactor', 'adamax', 'adamw', 'lion', 'sgd']"),
    ("logical_axis_rules", (("batch", "dp"),), "'logical_axis_rules' has the entry ('batch', 'dp')"),
    ("task", "lmm", "'task' is 'lmm'; expected one of"),
])
def test_values_that_make_no_sense_are_refused(key, value, message):
    config = make_config()
    config_lib.apply_overrides(config, {key: value})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        trainer.setup(config)


def test_stop_at_step_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--stop_at_step must be a positive step number, got 0"):
        trainer.train_and_evaluate(make_config(), str(tmp_path), stop_at_step=0)


STUDIES = ("length_generalization", "flash_speed", "position_probe", "zlpr_vs_bce")


@pytest.mark.parametrize("name", STUDIES)
def test_every_key_of_a_study_config_is_used_by_its_script(name):
    """Study scripts read their own configs; each key must appear as `config.KEY` (or a `config['KEY']`)
    in the script, for every variant. (flash_speed's quick variant also runs through a ReadRecorder in
    tests/train_lib/test_benchmark.py.)"""
    path = REPO / "experiments" / f"{name}.py"
    tree = ast.parse(path.read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in ("config", "cfg")}
    module = __import__(f"experiments.{name}", fromlist=["get_config"])
    for arg in (None, "quick", "small", "base"):
        try:
            config = module.get_config(arg)
        except ValueError:
            continue
        unused = [key for key in config.keys() if key not in used]
        assert not unused, (name, arg, unused)
