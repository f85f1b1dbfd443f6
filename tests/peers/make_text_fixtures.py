"""Writes the Hugging Face fixtures of `models.pretrained`: a tiny BERT and a tiny RoFormer with reference outputs.

Runs under the peers' PyTorch venv (it imports torch and transformers, never jax), from the repository root:

    .venv-peers/bin/python tests/peers/make_text_fixtures.py

and rewrites tests/fixtures/hf_bert_tiny/ and tests/fixtures/hf_roformer_tiny/ (about 110 KB each), which
tests/models/test_pretrained.py reads in the project venv. Each directory holds what `save_pretrained` wrote
(config.json, model.safetensors) and float32 references computed in eval mode (no dropout):

    input_ids.npy, token_type_ids.npy, attention_mask.npy   [batch, length] int32 (rows 1, 2 end in padding)
    last_hidden_state.npy [batch, length, hidden], mlm_logits.npy [batch, length, vocab]
    pooler_output.npy [batch, hidden]                       (BERT only: RoFormer has no pooler)

The models are random (torch seed 0) with `initializer_range` 0.2 rather than BERT's 0.02, so attention is far
from uniform, and every bias and LayerNorm parameter is perturbed away from its 0/1 initial value: a wrong
mapping (a transposed kernel, a swapped norm, an unpermuted rotary column) then moves the outputs by far more
than the parity tolerance. BERT is saved as `BertForPreTraining`, the head set of the original checkpoints
(bert-base-uncased): its file has the pooler, which `BertForMaskedLM` lacks, and the next-sentence head
`cls.seq_relationship`, which the importer does not use and must report. Its MLM logits are those of
`BertForMaskedLM.from_pretrained` on the same directory (checked below). RoFormer has embedding_size 16 ≠
hidden_size 32, so `embeddings_project` is exercised, and rotary_value False (the only kind importable).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
BATCH, LENGTH = 3, 12
VALID_LENGTHS = (LENGTH, 9, 5)  # row b's tokens after this are padding

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, type_vocab_size=2, initializer_range=0.2, hidden_act="gelu",
              layer_norm_eps=1e-12, attn_implementation="eager")


def perturb_biases_and_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Adds N(0, 0.2²) to every trainable bias and LayerNorm weight (ties are shared parameters: once each)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("bias") or "LayerNorm" in name):
                p.add_(0.2 * torch.randn(p.shape, generator=generator))


def reference_inputs(vocab_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(1, vocab_size, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    token_type_ids = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    for b, n in enumerate(VALID_LENGTHS):
        attention_mask[b, :n] = 1
        token_type_ids[b, n // 2:n] = 1  # a second segment in each row
        input_ids[b, n:] = 0  # [PAD]
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def save(model: transformers.PreTrainedModel, directory: Path, inputs: dict[str, torch.Tensor],
         outputs: dict[str, torch.Tensor]) -> None:
    """save_pretrained into `directory` (keeping only config.json and model.safetensors) plus the .npy files."""
    if directory.exists():
        shutil.rmtree(directory)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        directory.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(Path(tmp) / name, directory / name)
    for name, tensor in inputs.items():
        np.save(directory / f"{name}.npy", tensor.numpy().astype(np.int32))
    for name, tensor in outputs.items():
        np.save(directory / f"{name}.npy", tensor.detach().numpy().astype(np.float32))
    files = sorted(p.name for p in directory.iterdir())
    print(json.dumps({"dir": str(directory.relative_to(ROOT)), "files": files,
                      "kb": round(sum(p.stat().st_size for p in directory.iterdir()) / 1024, 1)}))


def make_bert(generator: torch.Generator) -> None:
    config = transformers.BertConfig(**COMMON)
    model = transformers.BertForPreTraining(config).eval()
    perturb_biases_and_norms(model, generator)
    inputs = reference_inputs(config.vocab_size, generator)
    with torch.no_grad():
        base = model.bert(**inputs)
        logits = model.cls.predictions(base.last_hidden_state)
    directory = FIXTURES / "hf_bert_tiny"
    save(model, directory, inputs, {"last_hidden_state": base.last_hidden_state, "mlm_logits": logits,
                                    "pooler_output": base.pooler_output})
    # The MLM head a user would load from this directory computes the same logits (its load report would list
    # the pooler and next-sentence head as unexpected: quieted).
    transformers.logging.set_verbosity_error()
    mlm = transformers.BertForMaskedLM.from_pretrained(directory, attn_implementation="eager").eval()
    transformers.logging.set_verbosity_warning()
    with torch.no_grad():
        torch.testing.assert_close(mlm(**inputs).logits, logits, rtol=0, atol=0)


def make_roformer(generator: torch.Generator) -> None:
    config = transformers.RoFormerConfig(**COMMON, embedding_size=16, rotary_value=False)
    model = transformers.RoFormerForMaskedLM(config).eval()
    perturb_biases_and_norms(model, generator)
    inputs = reference_inputs(config.vocab_size, generator)
    with torch.no_grad():
        hidden = model.roformer(**inputs).last_hidden_state
        logits = model(**inputs).logits
    save(model, FIXTURES / "hf_roformer_tiny", inputs, {"last_hidden_state": hidden, "mlm_logits": logits})


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    make_bert(generator)
    make_roformer(generator)


if __name__ == "__main__":
    main()
