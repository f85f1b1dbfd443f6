"""What `pip install kexue-jax` declares, and what importing the training stack checks first."""
import email
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory):
    """The METADATA of a wheel built from this checkout (no network: the venv's setuptools and wheel)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "README.md", "models", "losses", "train_lib", "experiments"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                             else {}))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(out.glob("kexue_jax-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(archive.read(name)), archive.namelist()


def test_the_base_install_is_what_losses_and_models_need(wheel_metadata):
    metadata, files = wheel_metadata
    requires = metadata.get_all("Requires-Dist")
    name = lambda r: re.sub(r"[-_.]+", "-", re.split(r"[<>=;! ]", r, maxsplit=1)[0]).lower()  # noqa: E731
    assert sorted(name(r) for r in requires if "extra ==" not in r) == ["chex", "flax", "jax", "numpy", "optax"]
    train = {name(r) for r in requires if "extra == \"train\"" in r}
    assert {"orbax-checkpoint", "grain", "ml-collections", "tensorboardx", "scikit-learn", "matplotlib"} <= train
    assert {"losses/__init__.py", "models/gau.py", "train_lib/trainer.py", "train_lib/lm/task.py",
            "experiments/gau_lm.py"} <= set(files)


def test_losses_and_models_import_nothing_of_the_training_stack():
    code = ("import sys, losses, models.gau, models.unet, models.diffusion.samplers; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'train_lib', 'orbax', 'grain', 'ml_collections', "
            "'tensorboardX', 'sklearn', 'matplotlib', 'absl'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] in ("[]", "['absl']")  # optax imports absl-py itself


def _run(code, cwd, extra_env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run([sys.executable, *code], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_importing_train_lib_without_the_extra_names_it(tmp_path):
    out = _run(["-c", "import sys; sys.modules['grain'] = None; import train_lib"], tmp_path)
    assert out.returncode != 0
    assert "train_lib needs the 'train' extra of kexue-jax (missing: grain): pip install 'kexue-jax[train]'" in out.stderr


def test_a_shadowing_models_file_is_named_in_one_line(tmp_path):
    (tmp_path / "models.py").write_text("x = 1\n")
    out = _run(["-m", "train_lib.main", "--help"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"error: kexue-jax: 'import models' finds {tmp_path / 'models.py'}, not kexue-jax's "
                                  f"{REPO / 'models'}: a file or package named 'models' earlier on sys.path shadows "
                                  "it; rename it or run from another directory")
    library = _run(["-c", "import train_lib"], tmp_path)
    assert library.returncode != 0 and "ImportError: kexue-jax: 'import models' finds" in library.stderr


def test_a_models_package_installed_over_ours_is_detected(tmp_path):
    """Another distribution's `models/__init__.py` in place of ours: a copy of the tree with it replaced."""
    for name in ("models", "losses", "train_lib"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "models" / "__init__.py").write_text("from .other import *\n")
    out = subprocess.run([sys.executable, "-c", "import train_lib"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0
    assert f"kexue-jax: {tmp_path / 'models' / '__init__.py'} is not kexue-jax's" in out.stderr
