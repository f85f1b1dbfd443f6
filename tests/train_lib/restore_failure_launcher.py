"""`python tests/train_lib/restore_failure_launcher.py PROCESS_ID ARGS...`: runs `python -m train_lib.main ARGS`
with every checkpoint restore failing with an out-of-memory error on process PROCESS_ID only (a test helper:
the failure is injected, the files are intact)."""
import runpy
import sys


def main() -> None:
    import jax

    from train_lib import checkpointing

    failing_process = int(sys.argv.pop(1))
    restore_items = checkpointing.Checkpointer._restore_items

    def failing(self, step, abstract_state, with_data):
        if jax.process_index() == failing_process:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: out of memory (injected on process {failing_process})")
        return restore_items(self, step, abstract_state, with_data)

    checkpointing.Checkpointer._restore_items = failing
    sys.argv[0] = "train_lib.main"
    runpy.run_module("train_lib.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
