"""Task names → task classes, by module path, imported only when a config asks for one.

This is the one place that names the model families. `config.task` is a key of `TASKS`, or a
`"package.module:ClassName"` path of a task class defined anywhere (a family in another project needs
no edit here). Importing a family's module imports its models; nothing else in the generic stack does.
"""
from __future__ import annotations

import importlib

from train_lib.config_lib import ConfigError

TASKS: dict[str, str] = {
    "lm": "train_lib.lm.task:LanguageModelTask",
    "mlm": "train_lib.lm.task:MaskedLanguageModelTask",
    "diffusion": "train_lib.diffusion.task:DiffusionTask",
    "siamese": "train_lib.selfsup.task:SiameseTask",
    "vae": "train_lib.vae.task:VAETask",
    "text_mlm": "train_lib.text.task:MaskedLanguageModelTask",
    "seq2seq": "train_lib.text.task:Seq2SeqTask",
    "classify": "train_lib.text.classify:ClassifyTask",
    "conditional_lm": "train_lib.text.conditional:ConditionalLMTask",
}


def task_class(name: str) -> type:
    """The class of task `name` (a key of TASKS or 'module:Class'), imported now."""
    if not isinstance(name, str):
        raise ConfigError(f"config: 'task' must be a string, one of {sorted(TASKS)} or 'package.module:TaskClass', "
                          f"got {name!r}")
    path = TASKS.get(name, name)
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"config: 'task' is {name!r}; expected one of {sorted(TASKS)} or a "
                          "'package.module:TaskClass' path")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if name in TASKS or e.name is None or not module_name.startswith(e.name):
            raise  # a missing dependency inside the family, not a wrong name
        raise ConfigError(f"config: 'task' {name!r}: no module {module_name!r} (expected one of "
                          f"{sorted(TASKS)} or a 'package.module:TaskClass' path)") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"config: 'task' {name!r}: module {module_name!r} has no class {class_name!r}") from None


def make_task(config):
    """The task of `config.task`, constructed (which validates its part of the config)."""
    return task_class(config.task)(config)


def command_line(module: str) -> str:
    return f"python -m {module}"
