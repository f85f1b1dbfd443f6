"""Checks `models.pretrained.save_huggingface` against transformers: exported directories must load and agree.

Two halves, one per venv, from the repository root. The export half (project venv, JAX) writes a directory with
save_huggingface plus our outputs on fixed inputs; the check half (peers venv, torch and transformers) loads that
directory with transformers and compares:

    .venv/bin/python tests/peers/check_hf_export.py --export tests/fixtures/hf_roformer_tiny /tmp/roformer_export
    .venv/bin/python tests/peers/check_hf_export.py --export random:bert /tmp/bert_random_export
    .venv-peers/bin/python tests/peers/check_hf_export.py /tmp/roformer_export

`--export DIR` re-exports a Hugging Face checkpoint loaded with load_huggingface (a round trip); `--export
random:bert|random:roformer` exports a freshly initialised encoder whose every parameter is random (an untied
decoder, tanh GELU and 3 segment types for BERT; no embedding projection for RoFormer), so the export is checked
on weights transformers never produced. Either writes into OUT: config.json, model.safetensors, the inputs
(input_ids, token_type_ids, attention_mask .npy) and our last_hidden_state, mlm_logits and, where the model has
a pooler, pooler_output (.npy, float32).

The check loads OUT with the class in its config's `architectures` (BertForMaskedLM / RoFormerForMaskedLM) and,
for pooler_output, with BertModel; prints one JSON line with the loading info (missing and unexpected keys; the
pooler is unexpected in BertForMaskedLM and used by BertModel) and the max abs difference of each output, and
exits 1 if a key is missing or a difference exceeds 1e-5 × max(1, max |reference|) (float32 rounding grows
with the outputs' scale). Not part of `make test` (pytest.ini ignores tests/peers).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

TOLERANCE = 1e-5
INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def random_encoder(kind: str):
    """A small TransformerEncoder of `kind` ('bert' or 'roformer') with all parameters random."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    from models.transformer import TransformerConfig, TransformerEncoder

    common = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_positions=40,
                  initializer_range=0.2)
    cfg = (TransformerConfig(**common, position="learned", type_vocab_size=3, hidden_act="gelu_tanh",
                             tie_embeddings=False) if kind == "bert"
           else TransformerConfig(**common, position="rope", use_pooler=False))
    model = TransformerEncoder(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), np.zeros((1, 1), np.int32))["params"])
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
    rng = np.random.default_rng(0)
    flat = {path: (value + 0.2 * rng.standard_normal(value.shape)).astype(np.float32) for path, value in flat.items()}
    return model, traverse_util.unflatten_dict(flat)


def export(source: str, out: Path) -> None:
    """save_huggingface of `source` into `out`, with fixed inputs and our outputs on them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from models import pretrained

    if source.startswith("random:"):
        model, params = random_encoder(source.split(":", 1)[1])
        rng = np.random.default_rng(1)
        cfg = model.config
        inputs = {"input_ids": rng.integers(1, cfg.vocab_size, (3, 10)).astype(np.int32),
                  "token_type_ids": rng.integers(0, cfg.type_vocab_size, (3, 10)).astype(np.int32),
                  "attention_mask": (np.arange(10)[None] < np.array([[10], [7], [3]])).astype(np.int32)}
    else:
        model, params = pretrained.load_huggingface(source)
        inputs = {name: np.load(Path(source) / f"{name}.npy") for name in INPUTS}
    if out.exists():
        shutil.rmtree(out)
    pretrained.save_huggingface(model, params, out)
    outputs = model.apply({"params": params}, inputs["input_ids"], segment_ids=inputs["token_type_ids"],
                          padding_mask=inputs["attention_mask"].astype(bool))
    for name, value in inputs.items():
        np.save(out / f"{name}.npy", value)
    names = {"hidden": "last_hidden_state", "mlm_logits": "mlm_logits", "pooled": "pooler_output"}
    for ours, theirs in names.items():
        if ours in outputs:
            np.save(out / f"{theirs}.npy", np.asarray(outputs[ours], np.float32))
    print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))


def check(directory: Path) -> int:
    """Loads `directory` with transformers and compares with its .npy references; returns the exit status."""
    import torch
    import transformers

    config = json.loads((directory / "config.json").read_text())
    architecture = config["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(
        directory, output_loading_info=True, attn_implementation="eager")
    model.eval()
    inputs = {name: torch.from_numpy(np.load(directory / f"{name}.npy").astype(np.int64)) for name in INPUTS}
    result = {"dir": str(directory), "architecture": architecture, "transformers": transformers.__version__,
              **{k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                 "mismatched_keys")}}
    with torch.no_grad():
        outputs = {"last_hidden_state": model.base_model(**inputs).last_hidden_state,
                   "mlm_logits": model(**inputs).logits}
        if (directory / "pooler_output.npy").exists():
            base = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
            outputs["pooler_output"] = base(**inputs).pooler_output
    ok = not result["missing_keys"]
    for name, value in outputs.items():
        reference = np.load(directory / f"{name}.npy")
        result[f"max_abs_diff_{name}"] = diff = float(np.abs(value.numpy() - reference).max())
        ok = ok and diff <= TOLERANCE * max(1.0, float(np.abs(reference).max()))
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", metavar="SOURCE", help="a checkpoint directory, or random:bert / random:roformer")
    parser.add_argument("dir", type=Path, help="the directory to write (with --export) or to check")
    args = parser.parse_args()
    if args.export:
        export(args.export, args.dir)
    else:
        sys.exit(check(args.dir))


if __name__ == "__main__":
    main()
