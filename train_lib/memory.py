"""Will a compiled step fit? XLA's buffer assignment against the device's memory, checked before running.

`compiled.memory_analysis()` gives the bytes one device needs for a compiled program (arguments, outputs
and temporaries, less what outputs reuse of donated arguments). A GPU or TPU reports its own limit
(`memory_stats()['bytes_limit']`); CPU devices, real or fake, share the host's memory, so each gets an
equal part of it. A step that would not fit is refused with the estimate instead of crashing mid-run.
"""
from __future__ import annotations

import os

import jax

from train_lib.config_lib import ConfigError


def needed_bytes(compiled) -> int | None:
    """Bytes one device needs for `compiled`, by XLA's buffer assignment; None if the backend does not say."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def device_bytes(device: jax.Device | None = None) -> int | None:
    """The memory one device may use: its own limit on accelerators, the host's share on CPUs."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return total // max(1, jax.local_device_count())


def describe_bytes(size: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size:.0f} B"


def check_fits(compiled, *, what: str, hint: str) -> None:
    """Raises ConfigError if `compiled` needs more memory per device than a device has."""
    need, have = needed_bytes(compiled), device_bytes()
    if need is not None and have is not None and need > have:
        device = jax.local_devices()[0]
        raise ConfigError(f"{what} needs an estimated {describe_bytes(need)} per device (XLA's buffer assignment), "
                          f"more than the {describe_bytes(have)} a {device.platform} device has here; {hint}")
