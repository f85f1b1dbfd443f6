"""Orbax checkpoints of the train state and the grain iterator position (after MaxText's checkpointing.py).

Each step directory holds two items: `state` (parameters, optimizer state, EMA, step, RNG; sharded
arrays, saved asynchronously) and `data` (each process's grain iterator state). Orbax writes a step
into a temporary directory and renames it when complete, so an interrupted save never looks like a
checkpoint; `restore_latest` starts from the newest step directory.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

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


class Checkpointer:
    """A `CheckpointManager` over `workdir/checkpoints` that saves and restores state plus data position."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
        """Starts an asynchronous save of `state` (and the iterator position) at `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """The state at `step`, laid out as `abstract_state`'s shardings; moves `data_iterator` in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        log.info("restored checkpoint %s", self.directory / str(step))
        return restored["state"]

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
