"""Orbax checkpoints of the train state and the data position (after MaxText's checkpointing.py).

Each step directory holds two items: `state` (parameters, optimizer state, EMA, step, RNG; sharded
arrays, saved asynchronously) and `data` (the grain iterator state as JSON). The iterator state is the
same on every process (each reads its rows of the same global batches), so process 0 writes it once and
any topology — another device count, another process count — restores it.

Orbax writes a step into a temporary directory and renames it when complete, so a save interrupted by a
kill never looks like a checkpoint. A checkpoint that is damaged anyway (truncated or missing files) is
moved to `<workdir>/damaged_checkpoints/` with a warning, and the previous one is used. One that loads
its index but holds other arrays than the run asks for (another model, optimizer or layer layout) is
left where it is: `CheckpointMismatchError` names the differences.
"""
from __future__ import annotations

import logging
import pathlib
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from train_lib.config_lib import ConfigError

log = logging.getLogger(__name__)

# Replica-parallel saving splits each replicated array across its replicas so that they write in
# parallel. That pays for large arrays on many hosts; for small ones it only costs a compiled slice
# per array shape and device, so only slices of at least this size are split.
_MIN_REPLICA_PARALLEL_SLICE_BYTES = 8 << 20
logging.getLogger("absl").disabled = True  # silence the "overriding jax.Array" notice of the next call
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_PARALLEL_SLICE_BYTES),
    override=True)
logging.getLogger("absl").disabled = False


# Pieces of the "Event loop is closed" tracebacks; several threads print them at once, interleaved
# even within lines, so they are removed piece by piece and the lines left empty dropped.
_CLOSED_LOOP_PIECES = re.compile(
    r"Traceback \(most recent call last\):|File \"[^\"]*asyncio/base_events\.py\", line \d+, in \w+|"
    r"self\._check_closed\(\)|raise RuntimeError\('Event loop is closed'\)|RuntimeError: |Event loop is closed")


@contextlib.contextmanager
def _without_closed_loop_tracebacks():
    """Drops the tracebacks that TensorStore prints while a damaged checkpoint fails to restore.

    When one array of a damaged checkpoint fails to read, Orbax closes its event loop while reads of
    other arrays are still finishing on TensorStore threads; their callbacks then fail and print
    'RuntimeError: Event loop is closed' tracebacks straight to file descriptor 2 (not through
    sys.excepthook). The failure itself is reported by `restore_newest_usable` as one warning, so
    fd 2 is captured for the duration of the restore and replayed without those lines.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            time.sleep(1.0)  # let the reads still in flight finish (and fail) while fd 2 is captured
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = _CLOSED_LOOP_PIECES.sub("", captured.read().decode("utf-8", "replace"))
            sys.stderr.write("".join(line for line in text.splitlines(keepends=True) if line.strip()))
            sys.stderr.flush()


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint could not be written."""


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


class Checkpointer:
    """A `CheckpointManager` over `directory` that saves and restores state plus data position."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
        """Starts an asynchronous save of `state` (and the iterator position) at `step`.

        The arrays are copied to host memory before this returns, so the caller may donate `state`.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(data_iterator.get_state())
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # disk full, directory removed or made read-only, ... (maybe in an earlier async save)
            raise self._write_error(e) from e

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """The state at `step`, laid out as `abstract_state`'s shardings; moves `data_iterator` in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return restored["state"]

    def restore_newest_usable(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """Restores the newest checkpoint that loads; damaged newer ones are moved aside with a warning.

        Returns None if there are no checkpoints; raises CheckpointError if there are some but none loads.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        moved = []
        for step in steps:
            mismatch = None
            try:
                with _without_closed_loop_tracebacks():
                    try:
                        state = self.restore(step, abstract_state, data_iterator)
                    except Exception:
                        mismatch = self._mismatch(step, abstract_state)  # read while fd 2 is still filtered
                        raise
            except Exception as e:  # truncated or missing files surface as many exception types
                if mismatch:
                    raise CheckpointMismatchError(self._mismatch_message(step, *mismatch, moved)) from None
                log.warning("checkpoint %s is damaged (%s: %s); moving it to damaged_checkpoints/ and trying "
                            "the previous one", self.directory / str(step), type(e).__name__,
                            " ".join(str(e).split())[:300])
                self._move_aside(step)
                moved.append(step)
                continue
            log.info("restored checkpoint %s", self.directory / str(step))
            return state
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} could be restored (moved to "
                                  f"{self.directory.parent / 'damaged_checkpoints'}); set "
                                  "--config.start_fresh_if_checkpoints_unusable=True to train from scratch instead")
        return None

    def _mismatch(self, step: int, abstract_state: Any) -> tuple[str, set[str]] | None:
        """(how checkpoint `step`'s arrays differ from `abstract_state`'s, the top-level fields that differ);
        None if they agree or the checkpoint's index is unreadable (then it is damaged, not another model's)."""
        try:
            saved = _shapes(self.manager.item_metadata(step)["state"])
        except Exception:
            return None
        wanted = _shapes(abstract_state)
        description = describe_mismatch(saved, wanted) if saved else None
        if description is None:
            return None
        return description, {path.split("/", 1)[0] for paths in _differences(saved, wanted) for path in paths}

    def _mismatch_message(self, step: int, description: str, fields: set[str], moved: list[int]) -> str:
        if "params" in fields:
            cause = "another model (model.*: e.g. num_layers, embed_dim, scan_layers)"
        elif fields == {"ema_params"}:
            cause = "another ema_decay (0 keeps no EMA copy)"
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
        self.manager.close()
