"""Test set-up: 8 fake CPU devices, set before JAX initialises its backends."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The trainer measures the machine's matmul peak for its MFU log (seconds); tests use a fixed value
# (inherited by the CLI subprocesses they start). tests/train_lib/test_benchmark.py measures it for real.
os.environ.setdefault("KEXUE_PEAK_FLOPS", "1e11")

# The CLIs add per-task XLA:CPU performance flags (train_lib/xla_flags.py); tests compile with XLA's own
# defaults in-process and in the CLI subprocesses they start (which inherit this), so runs compare exactly.
os.environ["KEXUE_XLA_DEFAULTS"] = "0"

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)

# A persistent compilation cache shared by all tests (and the CLI subprocesses they start, through
# the environment): runs that compile the same step reuse it instead of compiling again.
import tempfile  # noqa: E402

_CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                   os.path.join(tempfile.gettempdir(), "kexue-jax-test-compilation-cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
# The text family's derived data (parsed docstrings, built vocabularies: train_lib.text.corpora.cache_dir) is
# cached in the temporary directory too, never in the user's home, and shared by the CLI subprocesses.
os.environ.setdefault("KEXUE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kexue-jax-test-data-cache"))

# Property tests draw the same examples on every run, so CI is reproducible; a failing example
# is a real bug in code or tolerance, never a lucky draw. (Explore freely with --hypothesis-seed.)
import hypothesis  # noqa: E402

hypothesis.settings.register_profile("kexue", derandomize=True, deadline=None)
hypothesis.settings.load_profile("kexue")
