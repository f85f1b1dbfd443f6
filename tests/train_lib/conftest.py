"""Helpers for trainer tests: a very small LM config, and reading a run's metrics back."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import gau_lm
from train_lib import config_lib

REPO = pathlib.Path(__file__).resolve().parents[2]

# Overrides that make the tiny GAU LM train a step in milliseconds (tests care about behaviour, not quality).
TEST_OVERRIDES = {
    "total_steps": 12, "batch_size": 8, "log_every_steps": 1, "eval_every_steps": 1000, "eval_batches": 2,
    "checkpoint_every_steps": 3, "final_sample_tokens": 0, "data.seq_len": 32, "model.num_layers": 2,
    "model.embed_dim": 32, "model.key_dim": 16, "optimizer.warmup_steps": 2,
}


def make_config(**overrides):
    config = config_lib.apply_overrides(
        gau_lm.get_config("tiny"), {**TEST_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}})
    config.lock()
    return config


def read_metrics(workdir, split="train"):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def run_cli(args, *, devices=8, timeout=300, module="train_lib.main", cwd=REPO):
    """Runs `python -m module args` with `devices` fake CPU devices; returns the CompletedProcess."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_overrides(**overrides):
    merged = {**TEST_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config.{k}={v}" for k, v in merged.items()]


@pytest.fixture
def tiny_config():
    return make_config
