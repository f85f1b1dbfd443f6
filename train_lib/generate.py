"""`python -m train_lib.generate --workdir DIR ...`: runs the generation CLI of the workdir's family.

A seq2seq workdir goes to `python -m train_lib.text.generate` (`--input`, `--beam_size`, ...), a byte-level
LM's to `python -m train_lib.lm.generate` (`--prompt`, ...), the command of earlier versions; without a
readable workdir the LM CLI runs and reports what is wrong.
"""
import importlib
import json
import pathlib
import sys


def family_command(argv: list[str]) -> str:
    """The module of the family's generation CLI for the `--workdir` in `argv` (the LM's by default)."""
    workdir = None
    for i, arg in enumerate(argv):
        if arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg == "--workdir" and i + 1 < len(argv):
            workdir = argv[i + 1]
    try:
        task = json.loads((pathlib.Path(workdir) / "config.json").read_text())["task"]
        from train_lib import registry

        commands = registry.task_class(task).commands
    except Exception:  # noqa: BLE001  (the LM CLI reports a missing or broken workdir in one line)
        return "train_lib.lm.generate"
    return next((c for c in commands if c.endswith(".generate") and c != "train_lib.generate"),
                "train_lib.lm.generate")


def main(argv: list[str]) -> None:
    importlib.import_module(family_command(argv)).main(argv)


if __name__ == "__main__":
    main(sys.argv)
