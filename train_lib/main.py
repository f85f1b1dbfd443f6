"""Train an experiment: `python -m train_lib.main --config=experiments/gau_lm.py:tiny --workdir=runs/x`.

Override any config value with `--config.key=value` (the config is locked: a misspelled key is an
error, and so is a key nothing reads). A workdir that already has checkpoints is resumed from the newest
one; a workdir another live run holds is refused. Multi-process runs add
`--coordinator_address=host:port --num_processes=N --process_id=i` (auto-detected on TPU pods).
"""
from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from train_lib import cli, config_lib, xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file and variant, e.g. "
                                          "experiments/gau_lm.py:tiny (see experiments/).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_STOP_AT_STEP = flags.DEFINE_integer("stop_at_step", None, "Checkpoint and exit after this step (the schedule "
                                     "still follows total_steps); rerun the same command to continue.")
cli.define_distributed_flags()


def main(argv: list[str]) -> None:
    cli.parse_flags(argv)
    if not _WORKDIR.value:
        cli.fail("--workdir is required: the directory for checkpoints, metrics and logs")
    cli.run_guarded(lambda: config_lib.check_stop_at_step(_STOP_AT_STEP.value))
    config = cli.load_config(_CONFIG)

    def body():
        from train_lib import registry  # names the families; imports one only when asked for it
        xla_flags.apply_defaults(registry.task_class(config.task).xla_cpu_flags)  # before JAX starts a backend
        cli.setup_logging()
        cli.initialize_distributed()
        from train_lib import checkpointing, trainer  # imported after jax.distributed is initialised
        try:
            trainer.train_and_evaluate(config, _WORKDIR.value, stop_at_step=_STOP_AT_STEP.value)
        except (trainer.NonFiniteLossError, checkpointing.CheckpointError) as e:
            cli.fail(str(e), code=1)

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
