"""kexue-jax's training stack: the generic trainer, checkpoints, sharding and the task families.

Importing it checks two things first, each failing in one line: that the `train` extra is installed
(`pip install 'kexue-jax[train]'`), and that `models` and `losses` are kexue-jax's own packages, not a
file or package of the same name earlier on `sys.path` or installed over them by another distribution.
"""
import importlib.util as _util
import pathlib as _pathlib

# Import name -> distribution of what the `train` extra adds to the base install (setup.py).
_TRAIN_EXTRA = {"orbax.checkpoint": "orbax-checkpoint", "ml_collections": "ml_collections", "grain": "grain",
                "absl.flags": "absl-py", "tqdm": "tqdm", "tensorboardX": "tensorboardX", "sklearn": "scikit-learn",
                "matplotlib": "matplotlib", "PIL": "pillow"}


def _missing(module: str) -> bool:
    try:
        return _util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _check_install() -> None:
    missing = [dist for module, dist in _TRAIN_EXTRA.items() if _missing(module)]
    if missing:
        raise ImportError(f"train_lib needs the 'train' extra of kexue-jax (missing: {', '.join(missing)}): "
                          "pip install 'kexue-jax[train]'")
    root = _pathlib.Path(__file__).resolve().parent.parent
    for name in ("models", "losses"):
        spec = _util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        found = spec.origin if spec and spec.origin else (locations[0] if locations else None)
        if not locations or _pathlib.Path(locations[0]).resolve() != root / name:
            raise ImportError(f"kexue-jax: 'import {name}' finds {found}, not kexue-jax's {root / name}: a file or "
                              f"package named {name!r} earlier on sys.path shadows it; rename it or run from "
                              "another directory")
        marker = root / name / "__init__.py"
        if "KEXUE_JAX_PACKAGE" not in marker.read_text(encoding="utf-8", errors="replace"):
            raise ImportError(f"kexue-jax: {marker} is not kexue-jax's (another distribution installed a {name!r} "
                              "package over it); reinstall kexue-jax (pip install --force-reinstall kexue-jax) or "
                              "use a virtual environment without the other distribution")


def _check() -> None:
    """As a library, an ImportError; as a kexue-jax command (`python -m train_lib.X`), one line and exit 2."""
    import sys
    try:
        _check_install()
    except ImportError as error:
        argv = list(getattr(sys, "orig_argv", []))
        module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
        if module.split(".")[0] in ("train_lib", "experiments"):
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise


_check()
