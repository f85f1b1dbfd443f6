"""`python -m train_lib.generate`: the command of earlier versions, kept; it runs `python -m train_lib.lm.generate`,
the language-model sampling CLI (a task family's own CLI lives in its folder)."""
import sys

from train_lib.lm.generate import main

if __name__ == "__main__":
    main(sys.argv)
