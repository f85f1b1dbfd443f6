"""The timing protocol both peer scripts share (runs under the peers' PyTorch venv; not part of make test)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def train_step(optimizer, loss_fn: Callable, device) -> Callable[[], float]:
    """One complete optimizer step on `loss_fn()` (a scalar tensor), synchronised on CUDA; returns the loss."""
    import torch

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def time_steps(step: Callable[[], float], *, warmup: int, steps: int) -> dict:
    """Runs `step` (one complete train step returning its loss) `warmup` times, then times `steps` of them.

    Returns step_ms (median), step_ms_min, step_ms_max, the median in seconds and the last loss.
    """
    for _ in range(warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_s": median, "step_ms": 1e3 * median, "step_ms_min": 1e3 * min(times),
            "step_ms_max": 1e3 * max(times), "loss": loss}
