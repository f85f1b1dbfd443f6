"""Stopping cleanly when the scheduler preempts the job (SIGTERM) or the user presses Ctrl-C (SIGINT).

A signal only sets a flag; the loop checks it after each step, writes a checkpoint at that step, waits
for it and exits 0, so a restarted job loses nothing. With several processes the step to stop at must
be agreed by all of them: there JAX's preemption service (`multihost_utils.reached_preemption_sync_point`,
which listens for SIGTERM) picks the step, as Orbax and MaxText do.
"""
from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Context manager: inside it, `should_stop(step)` says whether to checkpoint and stop after `step`."""

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self._signal_name = signal.Signals(signum).name
        log.warning("received %s: stopping after the current step with a checkpoint", self._signal_name)

    def __enter__(self) -> "PreemptionWatcher":
        # Multi-process: SIGTERM belongs to JAX's preemption service, which coordinates the stop step, and
        # SIGINT keeps its default (a flag set on one process alone could not be agreed on).
        signals = () if self._multi_process else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        if self._multi_process:
            if multihost_utils.reached_preemption_sync_point(step):
                self._signal_name = self._signal_name or "SIGTERM"
                return True
            return False
        return self._signal_name is not None

    @property
    def signal_name(self) -> str | None:
        return self._signal_name
