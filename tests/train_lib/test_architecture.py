"""The layout is the architecture: the generic stack imports no model family, families import no other
family, losses import nothing of the training stack, and no package has an import cycle."""
import ast
import pathlib
import subprocess
import sys

import pytest

from tests.train_lib.conftest import REPO
from train_lib import registry, task as task_lib

PACKAGES = ("models", "losses", "train_lib", "experiments")
FAMILIES = ("train_lib.lm", "train_lib.diffusion", "train_lib.selfsup", "train_lib.text",
            "train_lib.vae")
# Commands of earlier versions kept as one-line aliases of a family's CLI (nothing imports them).
CLI_ALIASES = ("train_lib.generate", "train_lib.evaluate", "train_lib.sample")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, module: str, modules: set[str]) -> set[str]:
    """The modules of PACKAGES that `path` imports, at module level or inside functions. `from a import b`
    counts as importing `a.b` when that is a module, else as importing `a`."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {base}
    return {name for name in found if name in modules and name != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def test_no_import_cycles(graph):
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                raise AssertionError("import cycle: " + " → ".join(trail[trail.index(child):] + [child]))
            if child not in state:
                visit(child, trail + [child])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_generic_stack_imports_no_family_and_no_model(graph):
    generic = [m for m in graph if m.startswith("train_lib") and not m.startswith(FAMILIES) and m not in CLI_ALIASES]
    assert {"train_lib.trainer", "train_lib.task", "train_lib.registry", "train_lib.checkpointing"} <= set(generic)
    for module in generic:
        # models.backend is no model: the compile target that kernels choose by (train_lib.benchmark sets it
        # when compiling for a TPU topology), the one piece of models/ the generic stack may name.
        bad = {i for i in graph[module] if i.startswith(FAMILIES + ("models",)) and i != "models.backend"}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_families_import_no_other_family_and_losses_stand_alone(graph):
    for family in FAMILIES:
        others = tuple(f for f in FAMILIES if f != family)
        for module in (m for m in graph if m.startswith(family)):
            assert not {i for i in graph[module] if i.startswith(others)}, module
    for module in (m for m in graph if m.startswith("losses")):
        assert not {i for i in graph[module] if not i.startswith("losses")}, module


@pytest.mark.parametrize("entry, forbidden", [
    ("train_lib.trainer", ("train_lib.lm", "train_lib.diffusion", "models")),
    ("train_lib.lm.task", ("train_lib.diffusion", "models.unet", "models.diffusion")),
    ("train_lib.diffusion.task", ("train_lib.lm", "models.gau", "models.flash")),
    ("train_lib.selfsup.task", ("train_lib.lm", "train_lib.diffusion", "train_lib.text", "models.unet", "models.gau")),
])
def test_importing_one_part_loads_nothing_of_the_others(entry, forbidden):
    code = (f"import sys, jax, {entry}; from jax._src import xla_bridge; "
            "print(sorted(m for m in sys.modules if m.startswith(('models', 'train_lib.')))); "
            "print(bool(xla_bridge._backends))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, backend_started = out.stdout.strip().splitlines()[-2:]
    assert not [m for m in eval(loaded) if m.startswith(forbidden)], loaded
    assert backend_started == "False"  # the CLIs set a family's XLA flags after importing its task class


def test_registered_tasks_implement_the_protocol():
    for name in registry.TASKS:
        cls = registry.task_class(name)
        assert issubclass(cls, task_lib.TaskBase) and cls.commands and cls.description
        missing = [m for m in dir(task_lib.Task) if not m.startswith("_") and not hasattr(cls, m)
                   and m not in ("config", "units_per_batch", "throughput_unit", "compute_dtype")]
        assert not missing, (name, missing)


def test_registry_errors_name_the_choices():
    with pytest.raises(registry.ConfigError, match=r"'task' is 'lmm'; expected one of \['classify', 'conditional_lm', 'diffusion', 'lm', 'mlm', 'seq2seq', 'siamese', 'text_mlm', 'vae'\]"):
        registry.task_class("lmm")
    with pytest.raises(registry.ConfigError, match="no module 'no_such_family.task'"):
        registry.task_class("no_such_family.task:Task")
    with pytest.raises(registry.ConfigError, match="has no class 'Nope'"):
        registry.task_class("train_lib.lm.task:Nope")
