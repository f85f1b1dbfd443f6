"""Shared command-line plumbing: flag parsing with one-line errors, logging and jax.distributed set-up."""
from __future__ import annotations

import ast
import logging
import os
import pathlib
import re
import sys
import threading
import traceback
from typing import Callable, NoReturn

from absl import flags

from train_lib.config_lib import ConfigError

# Environment variables that mean "this process is one of several in a TPU pod or SLURM job":
# there jax.distributed.initialize() discovers the coordinator by itself.
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS")


def define_distributed_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
    flags.DEFINE_integer("initialization_timeout", 300,
                         "Seconds to wait for the other processes to start (multi-process runs).")
    flags.DEFINE_integer("heartbeat_timeout", 100,
                         "Seconds without a heartbeat after which a process is declared dead and the others stop "
                         "with an error instead of waiting for it (multi-process runs).")


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints `error: message` and exits at once with `code`.

    `os._exit` skips interpreter teardown, where background threads of Orbax and TensorStore that an
    aborted restore leaves behind can print tracebacks about closed event loops.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _override_hint(error: Exception, argv: list[str]) -> str:
    """One line for a --config.KEY=VALUE override whose key does not exist, keeping ml_collections' suggestion."""
    text = str(error.args[0] if error.args else error)
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
    match = re.search(r"'([^'\s]+)'", text)
    key = match.group(1) if match else text
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    offending = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0]), None)
    where = f" in {offending}" if offending else ""
    hint = f" (did you mean '{suggestion.group(1)}'?)" if suggestion else ""
    return f"config: unknown key '{key}'{where}{hint}; the config is locked, so only existing keys can be overridden"


_HELP = ("--help", "-h", "--helpfull", "--helpshort", "-?")


def print_help() -> NoReturn:
    """The main module's docstring, then every flag of this command (absl's own logging flags left out)."""
    main = sys.modules.get("__main__")
    text = [(main.__doc__ or "").strip(), ""]
    for module, module_flags in sorted(flags.FLAGS.flags_by_module_dict().items()):
        if module.startswith("absl."):
            continue
        for flag in sorted(module_flags, key=lambda f: f.name):
            default = "" if flag.default is None else f" (default: {flag.default_as_str or flag.default})"
            text.append(f"  --{flag.name}: {' '.join((flag.help or '').split())}{default}")
    text.append("  --config.KEY=VALUE: override any key of the experiment config (where there is --config)")
    print("\n".join(text).strip(), flush=True)
    sys.stdout.flush()
    os._exit(0)


def experiments_dir() -> pathlib.Path | None:
    """The directory of the installed `experiments` package (the experiment files shipped with kexue-jax)."""
    import importlib.util
    spec = importlib.util.find_spec("experiments")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return pathlib.Path(locations[0]) if locations else None


def resolve_config_path(value: str) -> str:
    """`FILE[:ARG]` of a --config flag, with FILE checked: an existing file is used as given; a path like
    `experiments/gau_lm.py` that is not there relative to the working directory is taken from the installed
    `experiments` package, so the commands work from any directory. Anything else fails in one line."""
    path, sep, arg = value.partition(":")
    package = experiments_dir()
    available = sorted(p.name for p in package.glob("*.py") if not p.name.startswith("_") and p.name != "common.py") \
        if package else []
    listing = f" (experiments/: {', '.join(available)})" if available else ""
    if os.path.isdir(path):
        fail(f"config: --config={value!r} is a directory; give an experiment file and variant, e.g. "
             f"--config=experiments/gau_lm.py:tiny{listing}")
    if not os.path.isfile(path):
        name = pathlib.PurePath(path)
        if package and name.parts[:1] == ("experiments",) and (package / pathlib.Path(*name.parts[1:])).is_file():
            path = str(package / pathlib.Path(*name.parts[1:]))
        else:
            fail(f"config: experiment file {path!r} does not exist (relative to {os.getcwd()!r}); give a path to one, "
                 f"or experiments/NAME.py for those installed with kexue-jax{listing}")
    try:
        tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8"), path)
    except SyntaxError as e:
        fail(f"config: {path} line {e.lineno}: SyntaxError: {e.msg}; fix the experiment file")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"config: cannot read experiment file {path!r}: {e}")
    if "get_config" not in _top_level_names(tree):
        fail(f"config: {path} defines no get_config(arg) function; an experiment file returns its ConfigDict from "
             "get_config (see experiments/gau_lm.py)")
    return path + sep + arg


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level: functions, classes, assignments and imports."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. a get_config defined under `if` or `try`
            names |= _top_level_names(ast.Module(body=[*node.body, *getattr(node, "orelse", [])], type_ignores=[]))
    return names


def _resolve_config_flag(argv: list[str]) -> list[str]:
    """argv with the FILE of `--config=FILE[:ARG]` (or `--config FILE[:ARG]`) resolved and checked."""
    out = list(argv)
    for i in range(1, len(out)):
        if out[i].startswith("--config="):
            out[i] = "--config=" + resolve_config_path(out[i].split("=", 1)[1])
        elif out[i] == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """Parses absl flags, turning any flag or config-override error into one line and exit status 2.

    `--help` prints the flags and exits 0. The experiment file of a `--config` flag is checked (and found in
    the installed package) before absl loads it. Returns the argv that was parsed.
    """
    if any(arg in _HELP for arg in argv[1:]):
        print_help()
    if "config" in flags.FLAGS:  # the experiment-file flag of train_lib.main, benchmark and the study scripts
        argv = _resolve_config_flag(argv)
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # an exception raised inside get_config
            lines = [lines[0], lines[-1]]
        fail(" ".join(lines).replace("flag --config.", "config: --config."))
    except (AttributeError, KeyError) as e:
        fail(_override_hint(e, argv))
    except (TypeError, ValueError) as e:
        fail(f"config: {' '.join(str(e).split())}")
    except Exception as e:  # noqa: BLE001  (raised by the experiment file's own code, e.g. a NameError)
        fail(f"config: {_where(e)}{type(e).__name__}: {' '.join(str(e).split())}")
    return argv


def _where(error: BaseException) -> str:
    """'FILE line N: ' of the innermost frame outside the libraries, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "site-packages" not in f.filename and "/train_lib/" not in f.filename]
    return f"{frames[-1].filename} line {frames[-1].lineno}: " if frames else ""


def _log_thread_exception(args) -> None:
    """Background threads (Orbax's asynchronous saves) report failures in one line; the main thread
    re-raises them where they matter (the next save or the final wait) with a clear message."""
    logging.getLogger("train_lib").warning("background thread %s failed: %s: %s", args.thread.name if args.thread
                                           else "?", args.exc_type.__name__, " ".join(str(args.exc_value).split())[:300])


class _OneLine(logging.Filter):
    """Keeps library log records to one line: drops attached tracebacks (the error is reported where it matters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.msg = f"{record.getMessage()} ({record.exc_info[0].__name__})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("train_lib").setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger(noisy).addFilter(_OneLine())
    threading.excepthook = _log_thread_exception


def initialize_distributed() -> None:
    """jax.distributed from explicit flags, or auto-detected on TPU pods and SLURM; nothing otherwise."""
    import jax

    f = flags.FLAGS
    explicit = (f.coordinator_address, f.num_processes, f.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            fail("--coordinator_address, --num_processes and --process_id must be given together")
        if not 0 <= f.process_id < f.num_processes:
            fail(f"--process_id must be in [0, {f.num_processes}), got {f.process_id}")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                                   process_id=f.process_id, initialization_timeout=f.initialization_timeout,
                                   heartbeat_timeout_seconds=f.heartbeat_timeout)
    elif any(os.environ.get(name) for name in _CLUSTER_ENV):
        jax.distributed.initialize()


def load_config(config_flag):
    """The experiment config of a `DEFINE_config_file` flag, or a one-line error naming what is wrong."""
    if flags.FLAGS[config_flag.name].present == 0 and flags.FLAGS[config_flag.name].default is None:
        fail(f"--{config_flag.name} is required, e.g. --{config_flag.name}=experiments/gau_lm.py:tiny")
    config_arg = flags.FLAGS[config_flag.name].serialize().split("=", 1)[-1]
    try:
        config = config_flag.value
        config.get("task")
    except Exception as e:  # raised while building the config, e.g. an unknown variant
        cause = e.__cause__ or e
        fail(f"config: cannot load {config_arg!r}: {_where(cause)}{' '.join(str(cause).split())}")
    if not hasattr(config, "get"):
        fail(f"config: get_config of {config_arg!r} returned {type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def run_study(script_file: str, run: Callable) -> None:
    """The command line of a study script in experiments/: `python -m experiments.NAME [--config=FILE:ARG]
    [--config.KEY=VALUE]` prints `run(config)`, the config defaulting to the script's own `get_config`.

    The flag is defined here, when the script runs, not when it is imported: config_flags re-imports the
    file to call its get_config.
    """
    from absl import logging as absl_logging
    from ml_collections import config_flags

    absl_logging.set_verbosity(absl_logging.WARNING)
    try:  # with a default, config_flags loads the file and applies --config.* overrides right here
        holder = config_flags.DEFINE_config_file("config", default=script_file, help_string="experiment config")
    except (AttributeError, KeyError) as e:
        fail(_override_hint(e, sys.argv))
    except Exception as e:  # noqa: BLE001
        fail(f"config: {_where(e)}{type(e).__name__}: {' '.join(str(e).split())}")
    parse_flags(sys.argv)
    config = load_config(holder)
    run_guarded(lambda: print(run(config)))


def run_guarded(body: Callable[[], None]) -> None:
    """Runs `body`, reporting ConfigError (exit 2) as one line without a traceback."""
    try:
        body()
    except ConfigError as e:
        fail(str(e))
