"""Workdirs written before the task-family split (commit 2b2d81e, tests/fixtures/*_workdir_2b2d81e: a step-2
checkpoint, its config.json and the losses that code went on to log) resume with today's code and
experiment files, step for step."""
import json
import shutil

import numpy as np
import pytest

from experiments import ddpm_digits, gau_lm
from tests.train_lib.conftest import REPO, read_metrics
from train_lib import checkpointing, config_lib, trainer

FIXTURES = {"lm": gau_lm, "diffusion": ddpm_digits}


@pytest.mark.parametrize("family", ["lm", pytest.param("diffusion", marks=pytest.mark.slow)])
def test_an_old_workdir_resumes_to_the_losses_the_old_code_logged(tmp_path, family):
    workdir = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / f"{family}_workdir_2b2d81e", workdir)
    expected = json.loads((workdir / "expected.json").read_text())
    config = config_lib.apply_overrides(FIXTURES[family].get_config(expected["variant"]), expected["overrides"])
    config.lock()
    result = trainer.train_and_evaluate(config, str(workdir))
    losses = {str(row["step"]): row["loss"] for row in read_metrics(workdir)}
    assert sorted(losses, key=int) == ["1", "2", "3", "4"]  # steps 1-2 kept from the old run, 3-4 trained now
    np.testing.assert_allclose([losses[s] for s in "34"], [expected["train_losses"][s] for s in "34"], rtol=1e-6)
    for key, value in expected["final_eval"].items():
        np.testing.assert_allclose(result["eval"][key], value, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FIXTURES))
def test_an_old_config_json_still_restores_its_parameters(family):
    run = checkpointing.restore_params(REPO / "tests" / "fixtures" / f"{family}_workdir_2b2d81e")
    assert run.step == 2 and run.ema and run.config.task == family
    assert "name" in run.config.model  # the old key nothing reads is tolerated when reading a workdir back
