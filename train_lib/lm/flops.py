"""Model FLOPs of the gated-attention language models in closed form (the MFU convention of
`train_lib.flops`: 2 FLOPs per multiply-add of every matrix product, attention included)."""
from __future__ import annotations

from models.gated_unit import GAUConfig


def lm_forward_flops_per_token(cfg: GAUConfig, seq_len: int) -> float:
    """Forward FLOPs per token of `models.gau.GAULanguageModel` at length `seq_len` (closed form).

    Per layer, with d = embed_dim, e = expansion·d, s = key_dim, n = seq_len, C = chunk_size:
      projections   2·(d·2e + d·s + e·d)            U,V (fused), Z, output
      GAU           2·n·s + 2·n·e                   QKᵀ and A·V over all n keys
      FLASH         2·C·s + 2·C·e + 2·s·e + 2·s·e   local QKᵀ, A·V in the chunk; K_linᵀV and Q_lin·ΣK_linᵀV
      Performer     FLASH-style chunks of C over m = performer_features random features, plus the
                    feature maps φ(Q), φ(K): 2·2·s·m + 2·C·m + 2·C·e + 2·m·e + 2·m·e (+ the causal/
                    non-causal normaliser's products, 2·C·m + 2·m)
    plus the output layer 2·d·V. The last FLASH chunk is computed padded, so n is rounded up to C.
    """
    d, e, s, vocab = cfg.embed_dim, cfg.expand_dim, cfg.key_dim, cfg.vocab_size
    projections = 2 * (d * 2 * e + d * s + e * d)
    chunks = -(-seq_len // cfg.chunk_size)
    padded = chunks * cfg.chunk_size / seq_len  # FLASH computes the padded tail of the last chunk
    c = cfg.chunk_size
    if cfg.attention == "gau":
        attention = 2 * seq_len * s + 2 * seq_len * e
    elif cfg.attention == "flash":
        attention = padded * (2 * c * s + 2 * c * e + 4 * s * e)
    elif cfg.attention == "performer":
        m = cfg.performer_features
        features = 2 * 2 * s * m
        if cfg.causal:
            # local φ(Q)φ(K)ᵀ and its products with V and with ones (the normaliser), past sums of
            # φ(K)ᵀV and φ(K), and φ(Q) times them.
            attention = features + padded * (2 * c * m + 2 * c * (e + 1) + 2 * m * (e + 1) + 2 * m * (e + 1))
        else:
            attention = features + 2 * m * (e + 1) + 2 * m * (e + 1)
    else:
        raise ValueError(f"no FLOP count for model.attention={cfg.attention!r}")
    return cfg.num_layers * (projections + attention) + 2 * d * vocab
