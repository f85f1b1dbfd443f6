"""`python -m train_lib.evaluate`: the command of earlier versions, kept; it runs `python -m train_lib.lm.evaluate`,
the language-model evaluation CLI (a task family's own CLI lives in its folder)."""
import sys

from train_lib.lm.evaluate import main

if __name__ == "__main__":
    main(sys.argv)
