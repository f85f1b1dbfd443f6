"""`python -m train_lib.sample`: the command of earlier versions, kept; it runs `python -m train_lib.diffusion.sample`,
the diffusion sampling CLI (a task family's own CLI lives in its folder)."""
import sys

from train_lib.diffusion.sample import main

if __name__ == "__main__":
    main(sys.argv)
