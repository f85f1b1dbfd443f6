"""XLA:CPU performance flags of a task family, applied by the CLIs before JAX starts a backend.

A task class names the flags measured to help it (`Task.xla_cpu_flags`). On the CPU, XLA 0.10's YNNPACK
integration also takes over elementwise and reduction fusions. For the diffusion U-Net (many small
convolutions, GroupNorms and SiLUs) keeping YNNPACK for the matmuls only makes the `unet_peer` train step
about 30% faster on a 2-core AVX2 CPU (128 → 91 ms; README "Performance"); for the FLASH LM it is about 5%
slower, so the LM tasks keep XLA's defaults. The flags only concern CPU compilation; JAX reads `XLA_FLAGS`
when it starts its first backend, so they must be set before that.

A flag already present in `XLA_FLAGS` is left as the user set it. The defaults are applied only for
the jaxlib versions they were measured with (an unknown flag aborts XLA), and never when
`KEXUE_XLA_DEFAULTS=0` (the tests set it, so that in-process and command-line runs compile alike).
"""
from __future__ import annotations

import importlib.metadata
import os

MEASURED_JAXLIB = ("0.10.",)  # jaxlib version prefixes the flags were measured with (and exist in)


def applicable(task_flags: dict[str, str]) -> dict[str, str]:
    """`task_flags` if the installed jaxlib is one they were measured with, else {}."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return {}
    return dict(task_flags) if version.startswith(MEASURED_JAXLIB) else {}


def apply_defaults(task_flags: dict[str, str], environ=os.environ) -> str:
    """Appends the flags missing from `XLA_FLAGS` (unless KEXUE_XLA_DEFAULTS=0); returns XLA_FLAGS."""
    current = environ.get("XLA_FLAGS", "")
    if environ.get("KEXUE_XLA_DEFAULTS", "1") == "0":
        return current
    extra = [f"--{name}={value}" for name, value in applicable(task_flags).items() if f"--{name}=" not in current]
    if extra:
        environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return environ.get("XLA_FLAGS", "")
