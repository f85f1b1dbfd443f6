"""Float64 NumPy references for the GAU/FLASH tests, written from the formulas (REFERENCES.md), loop by loop.

They share no code with `models/`: each normaliser is one row at a time, FLASH one query at a time.
"""
import numpy as np
from scipy.special import logsumexp


def normalize_row(name, scores, mask, *, key_dim, train_length=512, sequence_length=None):
    """Attention weights of one row: scores, mask `[n_k]`; masked weights are 0."""
    b = scores.astype(np.float64)
    valid = mask.astype(bool)
    if not valid.any():
        return np.zeros_like(b)
    l = valid.sum()
    w = np.zeros_like(b)
    if name in ("softmax", "softmax_plus", "l2"):
        z = b[valid] / np.sqrt(key_dim)
        if name == "softmax_plus":
            z = z * np.log(max(l, 16)) / np.log(512)
        if name == "l2":  # e^{z} / sqrt(Σ e^{2z}), in log space: exp(z − ½ log Σ e^{2z})
            w[valid] = np.exp(z - 0.5 * logsumexp(2 * z))
        else:
            w[valid] = np.exp(z - logsumexp(z))
    elif name == "relu2":
        w[valid] = np.maximum(b[valid] / np.sqrt(key_dim), 0) ** 2 / l
    elif name == "relu2_fixed":
        w[valid] = np.maximum(b[valid] / np.sqrt(key_dim), 0) ** 2 / train_length
    elif name == "relu2_paper":
        w[valid] = np.maximum(b[valid] / sequence_length, 0) ** 2
    else:
        raise KeyError(name)
    return w


def normalize(name, scores, mask, *, key_dim, train_length=512, sequence_length=None):
    """`normalize_row` over `[batch, n_q, n_k]`; relu2_paper's n defaults to the keys some row sees."""
    out = np.zeros(scores.shape, np.float64)
    for bi in range(scores.shape[0]):
        n = sequence_length if sequence_length is not None else mask[bi].any(axis=0).sum()
        n = n[bi] if np.ndim(n) else n
        for qi in range(scores.shape[1]):
            out[bi, qi] = normalize_row(name, scores[bi, qi], mask[bi, qi], key_dim=key_dim,
                                        train_length=train_length, sequence_length=n)
    return out


def mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal, normalizer, key_valid=None,
                          train_length=512):
    """FLASH's V̂_quad + V̂_lin (arXiv 2202.10447 Sec. 3.2; causal global part / visible tokens, post 8934)."""
    q_quad, k_quad, q_lin, k_lin, v = (np.asarray(t, np.float64) for t in (q_quad, k_quad, q_lin, k_lin, v))
    b, n, e = v.shape
    valid = np.ones((b, n), bool) if key_valid is None else np.asarray(key_valid, bool)
    out = np.zeros((b, n, e))
    for bi in range(b):
        for t in range(n):
            g = t // chunk_size
            slots = np.arange(g * chunk_size, (g + 1) * chunk_size)  # C slots; those ≥ n are padding
            real = slots < n
            scores = np.zeros(chunk_size)
            scores[real] = k_quad[bi, slots[real]] @ q_quad[bi, t]
            mask = real.copy()
            mask[real] &= valid[bi, slots[real]]
            if causal:
                mask &= slots <= t
            w = normalize_row(normalizer, scores, mask, key_dim=q_quad.shape[-1], train_length=train_length,
                              sequence_length=chunk_size)
            local = sum(w[i] * v[bi, slots[i]] for i in range(chunk_size) if real[i])
            if causal:
                seen = [j for j in range(g * chunk_size) if valid[bi, j]]
                count = max(valid[bi, :t + 1].sum(), 1)
            else:
                seen = [j for j in range(n) if valid[bi, j]]
                count = max(valid[bi].sum(), 1)
            state = sum((np.outer(k_lin[bi, j], v[bi, j]) for j in seen), np.zeros((q_lin.shape[-1], e)))
            out[bi, t] = local + q_lin[bi, t] @ state / count
    return out


def hierarchical_positions(table, positions, alpha):
    """Post 7947: u_i = (p_i − α p_0)/(1 − α); position i·n + j → α u_i + (1 − α) u_j."""
    table = np.asarray(table, np.float64)
    n = table.shape[0]
    u = (table - alpha * table[0]) / (1 - alpha)
    return np.stack([alpha * u[p // n] + (1 - alpha) * u[p % n] for p in positions])
