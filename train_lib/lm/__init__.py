"""The byte-level language-model family: tasks 'lm' and 'mlm', byte data, KV-cache decoding, and the
`generate` and `evaluate` CLIs (python -m train_lib.lm.generate / train_lib.lm.evaluate)."""
