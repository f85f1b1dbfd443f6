"""Workarounds for other libraries' behaviour, in one place (each says what it works around and why).

- Orbax/TensorStore: when one array of a damaged checkpoint fails to read, Orbax closes its asyncio loop
  while TensorStore threads are still finishing other reads; their callbacks then print "RuntimeError:
  Event loop is closed" tracebacks straight to file descriptor 2 (`without_closed_loop_tracebacks` filters
  them; `let_failed_reads_finish` waits for those reads before going on).
- Orbax logs notices through absl at WARNING for things we ask for on purpose (`quiet_absl`).
- Orbax's default ArrayHandler splits every replicated array across its replicas when saving
  (`register_array_handler` keeps that for large arrays only).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

# Replica-parallel saving splits each replicated array across its replicas so that they write in
# parallel. That pays for large arrays on many hosts; for small ones it only costs a compiled slice
# per array shape and device, so only slices of at least this size are split.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 8 << 20

# Pieces of the "Event loop is closed" tracebacks; several threads print them at once, interleaved
# even within lines, so they are removed piece by piece and the lines left empty dropped.
_CLOSED_LOOP_PIECES = re.compile(
    r"Traceback \(most recent call last\):|File \"[^\"]*asyncio/base_events\.py\", line \d+, in \w+|"
    r"self\._check_closed\(\)|raise RuntimeError\('Event loop is closed'\)|RuntimeError: |Event loop is closed")


@contextlib.contextmanager
def quiet_absl():
    """absl's logger (which Orbax logs through) silenced for the block."""
    absl_log = logging.getLogger("absl")
    absl_log.disabled = True
    try:
        yield
    finally:
        absl_log.disabled = False


def register_array_handler() -> None:
    """jax.Array checkpointed by an ArrayHandler that splits only slices of MIN_REPLICA_PARALLEL_SLICE_BYTES."""
    with quiet_absl():  # Orbax announces that it overrides the jax.Array handler: it is what we ask for
        handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def let_failed_reads_finish() -> None:
    """Waits for TensorStore's reads still in flight after a failed read (they fail too, on their threads)."""
    time.sleep(1.0)


@contextlib.contextmanager
def without_closed_loop_tracebacks():
    """File descriptor 2 captured for the block and replayed without the "Event loop is closed" tracebacks
    (see the module docstring); the failure itself is reported by the caller, in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            let_failed_reads_finish()
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = _CLOSED_LOOP_PIECES.sub("", captured.read().decode("utf-8", "replace"))
            sys.stderr.write("".join(line for line in text.splitlines(keepends=True) if line.strip()))
            sys.stderr.flush()
