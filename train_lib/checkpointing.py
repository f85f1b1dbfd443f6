"""Orbax checkpoints of the train state and the data position (after MaxText's checkpointing.py).

Each step directory holds two items: `state` (parameters, optimizer state, EMA, step, RNG; sharded
arrays, saved asynchronously) and `data` (the grain iterator state as JSON). The iterator state is the
same on every process (each reads its rows of the same global batches), so process 0 writes it once and
any topology — another device count, another process count — restores it.

Orbax writes a step into a temporary directory and renames it when complete, so a save interrupted by a
kill never looks like a checkpoint. When a restore fails anyway, the files decide what happens:

- its arrays differ from the config's (another model, optimizer or layer layout): the run stops with
  `CheckpointMismatchError` naming the differences, and nothing is moved;
- reading its files back shows them missing, truncated or unreadable (`damage_evidence`): it is moved to
  `<workdir>/damaged_checkpoints/` with a warning, and the previous one is tried;
- anything else (out of memory, a storage outage): the run stops with the error and nothing is moved.

With several processes each classifies its own attempt and all act on the worst outcome (`_agree`).
`restore_params` reads a workdir's newest parameters back for the CLIs and studies.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import shutil
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from train_lib import library_quirks
from train_lib import state as state_lib
from train_lib.config_lib import ConfigError

log = logging.getLogger(__name__)

library_quirks.register_array_handler()


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint could not be written."""


class NoUsableCheckpointError(CheckpointError):
    """There are checkpoints, and every one was shown damaged and moved aside."""


class CheckpointRestoreError(CheckpointError):
    """A restore failed for a reason other than damaged files (memory, storage): nothing was moved."""


class CheckpointMismatchError(ConfigError):
    """The checkpoints were written by another model or optimizer than the config describes."""


def _key_path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_key_path(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, "shape")}


def _differences(saved: dict[str, tuple], wanted: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """(paths only `wanted` has, paths only `saved` has, paths whose shapes differ), each sorted."""
    return (sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted)),
            sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k]))


def describe_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple], *, limit: int = 3) -> str | None:
    """What differs between two {array path: shape} maps, in one line; None if they agree."""
    missing, extra, reshaped = _differences(saved, wanted)
    parts = []
    if missing:
        parts.append(f"{len(missing)} arrays the config needs are not in it (e.g. {', '.join(missing[:limit])})")
    if extra:
        parts.append(f"{len(extra)} arrays in it are not in the config's model (e.g. {', '.join(extra[:limit])})")
    if reshaped:
        parts.append(f"{len(reshaped)} have another shape (e.g. " + ", ".join(
            f"{k}: {saved[k]} saved, {wanted[k]} wanted" for k in reshaped[:limit]) + ")")
    return "; ".join(parts) or None


# Evidence that a checkpoint's files are damaged, in the errors of reading them back: TensorStore's status
# codes for missing, short or corrupt data, and Orbax's and JSON's for missing or unreadable metadata.
# Anything else (out of memory, a storage outage, a permission) says nothing about the files.
_DAMAGE_EVIDENCE = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION)\b|No structure could be "
                              r"identified|incomplete checkpoint|Expecting value|Unterminated string|not found")
_OK, _DAMAGED, _MISMATCH, _ERROR = 0, 1, 2, 3  # a restore's outcome; with several processes the worst wins


def _saved(state: Any) -> Any:
    """What a checkpoint holds for `state`: a train state as its dict (`train_lib.state.to_checkpoint`)."""
    return state_lib.to_checkpoint(state) if isinstance(state, state_lib.TrainState) else state


def _one_line(error: BaseException, limit: int = 300) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


class Checkpointer:
    """A `CheckpointManager` over `directory` that saves and restores state plus data position.

    Saving is collective (every process writes its shards, process 0 commits). Restoring goes through a
    second manager that treats each process on its own, so a process that fails to read never leaves
    another waiting in Orbax's restore barrier: the processes then agree on one outcome.
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int, async_save: bool = True, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        me = jax.process_index()
        local = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                   barrier_sync_key_prefix=f"restore_{me}")
        with library_quirks.quiet_absl():  # Orbax explains at length what read_only implies: what we ask for
            self._reader = ocp.CheckpointManager(
                self.directory, item_handlers=self._handlers(),
                options=ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=local))
        # Reading a workdir back (read_only) writes nothing into it.
        self.manager = self._reader if read_only else ocp.CheckpointManager(
            self.directory, item_handlers=self._handlers(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    @staticmethod
    def _handlers():
        return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
        """Starts an asynchronous save of `state` (and the iterator position) at `step`.

        The arrays are copied to host memory before this returns, so the caller may donate `state`.
        """
        items = {"state": ocp.args.StandardSave(_saved(state))}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(data_iterator.get_state())
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # disk full, directory removed or made read-only, ... (maybe in an earlier async save)
            raise self._write_error(e) from e

    def _restore_items(self, step: int, abstract_state: Any, with_data: bool) -> dict[str, Any]:
        items = {"state": ocp.args.StandardRestore(_saved(abstract_state))}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = dict(self._reader.restore(step, args=ocp.args.Composite(**items)))
        if isinstance(abstract_state, state_lib.TrainState):
            restored["state"] = state_lib.from_checkpoint(restored["state"])
        return restored

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """The state at `step`, laid out as `abstract_state`'s shardings; moves `data_iterator` in place."""
        restored = self._restore_items(step, abstract_state, data_iterator is not None)
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return restored["state"]

    def restore_newest_usable(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """Restores the newest checkpoint that loads; newer ones shown to be damaged are moved aside.

        Returns None if there are no checkpoints. Raises CheckpointMismatchError if the newest readable one
        holds another model's arrays, and CheckpointError if none loads or a restore fails for a reason
        other than damaged files (then nothing is moved).
        """
        self._reader.reload()
        steps = sorted(self._reader.all_steps(), reverse=True)
        moved = []
        for step in steps:
            outcome, result = self.try_restore(step, abstract_state, data_iterator is not None)
            agreed = _agree(outcome)
            if agreed == _OK:
                if data_iterator is not None:
                    data_iterator.set_state(result["data"])
                log.info("restored checkpoint %s", self.directory / str(step))
                return result["state"]
            if agreed == _MISMATCH:
                detail = result if outcome == _MISMATCH else "another process found other arrays than the config's"
                raise CheckpointMismatchError(self.mismatch_message(step, *detail, moved) if outcome == _MISMATCH
                                              else f"checkpoint {self.directory / str(step)}: {detail}")
            if agreed == _ERROR:
                raise CheckpointRestoreError(self._restore_error_message(step, outcome, result))
            evidence = result if outcome == _DAMAGED else "damaged as another process read it"
            log.warning("checkpoint %s is damaged (%s); moving it to damaged_checkpoints/ and trying the previous "
                        "one", self.directory / str(step), evidence)
            self._move_aside(step)
            moved.append(step)
        if steps:
            raise NoUsableCheckpointError(f"none of the checkpoints {steps} in {self.directory} could be restored (moved to "
                                  f"{self.directory.parent / 'damaged_checkpoints'}); set "
                                  "--config.start_fresh_if_checkpoints_unusable=True to train from scratch instead")
        return None

    def try_restore(self, step: int, abstract_state: Any, with_data: bool) -> tuple[int, Any]:
        """(outcome, result) of restoring checkpoint `step` on this process alone: (_OK, restored items),
        (_MISMATCH, (description, fields)), (_DAMAGED, evidence) or (_ERROR, (error, the read-back error or
        None))."""
        with library_quirks.without_closed_loop_tracebacks():
            try:
                return _OK, self._restore_items(step, abstract_state, with_data)
            except Exception as error:  # noqa: BLE001  (classified below, by what the files show)
                mismatch = self._mismatch(step, abstract_state)
                evidence, read_back_error = (None, None) if mismatch else self.damage_evidence(step, with_data=with_data)
                library_quirks.let_failed_reads_finish()  # while fd 2 is still filtered
                if mismatch:
                    return _MISMATCH, mismatch
                return (_DAMAGED, evidence) if evidence else (_ERROR, (error, read_back_error))

    def damage_evidence(self, step: int, *, with_data: bool = True,
                        budget_bytes: int = 256 << 20) -> tuple[str | None, str | None]:
        """(why checkpoint `step` is damaged, the error of a read-back that shows nothing), by reading its
        files back on this process alone: the data position and every array, to host memory, a group of
        at most `budget_bytes` at a time. Damage is missing, truncated or unreadable metadata or data
        (`_DAMAGE_EVIDENCE`); another failure (memory, storage, permissions) proves nothing. (None, None):
        everything reads back whole."""
        me = jax.process_index()
        local = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                   barrier_sync_key_prefix=f"evidence_{me}")
        checker = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
                                   multiprocessing_options=local)
        try:
            if with_data:
                self._reader.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
            path = self.directory / str(step) / "state"
            metadata = checker.metadata(path).item_metadata
            if metadata is None:
                return f"no readable metadata in {path}", None
            leaves, treedef = jax.tree_util.tree_flatten(metadata.tree)
            for group in _groups([math.prod(m.shape) * np.dtype(m.dtype).itemsize for m in leaves], budget_bytes):
                pick = lambda value: [value if i in group else ocp.PLACEHOLDER for i in range(len(leaves))]  # noqa
                checker.restore(path, args=ocp.args.PyTreeRestore(
                    item=jax.tree_util.tree_unflatten(treedef, pick(0)),
                    restore_args=jax.tree_util.tree_unflatten(treedef, pick(ocp.RestoreArgs(restore_type=np.ndarray)))))
        except Exception as error:  # noqa: BLE001
            library_quirks.let_failed_reads_finish()
            damaged = isinstance(error, (json.JSONDecodeError, FileNotFoundError)) or _DAMAGE_EVIDENCE.search(str(error))
            return (_one_line(error), None) if damaged else (None, _one_line(error))
        return None, None

    def _restore_error_message(self, step: int, outcome: int, result) -> str:
        where = self.directory / str(step)
        if outcome != _ERROR:
            return (f"restoring checkpoint {where} failed on another process (its error is in that process's log); "
                    "it was left in place: fix the cause and rerun the same command")
        error, read_back_error = result
        shown = ("its files read back whole, so it is not damaged" if read_back_error is None else
                 f"reading its files back failed too ({read_back_error}), which does not show them damaged")
        return (f"restoring checkpoint {where} failed ({_one_line(error)}); {shown}, and it was left in place: fix "
                "the cause and rerun the same command")

    def _mismatch(self, step: int, abstract_state: Any) -> tuple[str, set[str]] | None:
        """(how checkpoint `step`'s arrays differ from `abstract_state`'s, the top-level fields that differ);
        None if they agree or the checkpoint's index is unreadable (then it is damaged, not another model's)."""
        try:
            saved = _shapes(self._reader.item_metadata(step)["state"])
        except Exception:
            return None
        wanted = _shapes(_saved(abstract_state))
        description = describe_mismatch(saved, wanted) if saved else None
        if description is None:
            return None
        return description, {path.split("/", 1)[0] for paths in _differences(saved, wanted) for path in paths}

    def mismatch_message(self, step: int, description: str, fields: set[str], moved: list[int]) -> str:
        if "params" in fields:
            cause = "another model (model.*: e.g. num_layers, embed_dim, scan_layers)"
        elif fields == {"ema_params"}:
            cause = "another ema_decay (0 keeps no EMA copy)"
        elif fields == {"model_state"}:
            cause = "another model (its non-gradient variables, e.g. batch-norm statistics, differ)"
        elif "opt_state" in fields:
            cause = "other optimizer settings (optimizer.*, grad_clip_norm)"
        else:
            cause = f"another config (differing: {', '.join(sorted(fields))})"
        config_json = self.directory.parent / "config.json"
        started = f" ({config_json})" if config_json.exists() else ""
        left = (f"it and the older ones were left in place (newer, damaged ones {moved} were moved to "
                "damaged_checkpoints/)" if moved else "nothing was moved or changed")
        return (f"checkpoint {self.directory / str(step)} does not fit the config: {description}. It was written "
                f"with {cause}; resume with the config the run was started with{started}, or use another "
                f"--workdir; {left}.")

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.directory.parent / "damaged_checkpoints" / f"{step}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        self._reader.reload()

    def wait_until_finished(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from e

    def _write_error(self, error: Exception) -> CheckpointError:
        message = " ".join(str(error).split())
        return CheckpointError(f"writing a checkpoint in {self.directory} failed: {message[:400]}; the complete "
                               f"checkpoints {sorted(self.manager.all_steps())} are untouched")

    def close(self) -> None:
        if self.manager is not self._reader:
            self.manager.close()
        self._reader.close()


def _groups(sizes: list[int], budget: int) -> list[set[int]]:
    """Consecutive indices of `sizes` in groups whose total stays within `budget` (a larger one alone)."""
    groups, current, total = [], set(), 0
    for index, size in enumerate(sizes):
        if current and total + size > budget:
            groups.append(current)
            current, total = set(), 0
        current.add(index)
        total += size
    return groups + ([current] if current else [])


def _agree(outcome: int) -> int:
    """The worst outcome over all processes (a collective; every process calls it with its own)."""
    if jax.process_count() == 1:
        return outcome
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray([outcome], np.int32), tiled=True)))


# --------------------------------------------------------------------------------------------------
# Reading a finished (or running) workdir back: its config and its newest parameters.
# --------------------------------------------------------------------------------------------------
def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a training workdir was written with (`config.json`), or a one-line ConfigError."""
    path = pathlib.Path(workdir) / "config.json"
    if not pathlib.Path(workdir).is_dir():
        raise ConfigError(f"--workdir: {str(workdir)!r} is not a directory; give a training run's --workdir")
    if not path.is_file():
        raise ConfigError(f"--workdir: {str(workdir)!r} has no config.json; is it a training workdir?")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--workdir: {str(path)!r} is not valid JSON ({e}); it is written by the trainer, "
                          "restore it from the run's first start or rerun training") from None
    if not isinstance(values, dict) or not isinstance(values.get("task"), str):
        raise ConfigError(f"--workdir: {str(path)!r} does not describe a training run (no 'task' key)")
    return ml_collections.ConfigDict(values)


@dataclasses.dataclass(frozen=True)
class RestoredParams:
    """What `restore_params` read from a workdir."""

    task: Any  # the Task of the run's config
    params: Any
    step: int
    ema: bool  # whether `params` are the EMA parameters
    config: ml_collections.ConfigDict
    model_state: Any = None  # the non-gradient variables (`Task.init_model_state`), None for a task without them


def restore_params(workdir: str | pathlib.Path, *, use_ema: bool = True, mesh: jax.sharding.Mesh | None = None,
                   command: str | None = None) -> RestoredParams:
    """The newest parameters of a training workdir, with the task that trained them.

    Args:
      workdir: a `train_lib.main` workdir (config.json and checkpoints/).
      use_ema: the EMA parameters when the run kept them (else the raw ones; `RestoredParams.ema` says which).
      mesh: lay the parameters out on this mesh by the run's logical axis rules; None: on one device.
      command: the module name of the calling CLI; a workdir of a task that CLI does not serve is refused
        with a line naming the CLIs that do (`Task.commands`).
    Raises:
      ConfigError, one line: not a workdir, a broken config.json, a task this CLI does not serve, no
      checkpoint yet, or checkpoints that do not fit the config.
    """
    from train_lib import config_lib, optim, registry, sharding

    workdir = pathlib.Path(workdir)
    config = load_run_config(workdir)
    cls = registry.task_class(config.task)
    if command is not None and command not in cls.commands:
        served_by = " or ".join(registry.command_line(c) for c in cls.commands) or "none of the CLIs"
        raise ConfigError(f"--workdir: {str(workdir)!r} holds {cls.description} (task {config.task!r}), which "
                          f"{registry.command_line(command)} does not serve; use {served_by}")
    try:
        task = cls(config)
        optimizer = optim.make_optimizer(config.optimizer, config.total_steps)
        keeps_ema = config.ema_decay > 0
    except (AttributeError, KeyError, TypeError) as e:
        raise ConfigError(f"--workdir: {str(workdir / 'config.json')!r} lacks or mistypes a key the task needs "
                          f"({' '.join(str(e).split())[:200]})") from None
    if not (workdir / "checkpoints").is_dir():
        raise ConfigError(f"--workdir: {str(workdir / 'checkpoints')!r} holds no checkpoint yet")
    task.read_assets(workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=1, read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConfigError(f"--workdir: {str(workdir / 'checkpoints')!r} holds no checkpoint yet")
        boxed = state_lib.abstract_boxed(task, optimizer, ema=keeps_ema, batch_size=1)
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, state_lib.unbox(boxed))
        else:
            rules = config_lib.logical_axis_rules(config)
            shardings = sharding.state_shardings(boxed, mesh, rules)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state_lib.unbox(boxed),
                                shardings)
        outcome, result = checkpointer.try_restore(step, abstract, False)
        if outcome == _MISMATCH:
            raise CheckpointMismatchError(checkpointer.mismatch_message(step, *result, []))
        if outcome != _OK:
            raise ConfigError(f"--workdir: checkpoint {workdir / 'checkpoints' / str(step)} cannot be read ("
                              f"{result if outcome == _DAMAGED else _one_line(result[0])})")
    finally:
        checkpointer.close()
    state = result["state"]
    ema = use_ema and state.ema_params is not None
    return RestoredParams(task, state.ema_params if ema else state.params, step, ema, config, state.model_state)
