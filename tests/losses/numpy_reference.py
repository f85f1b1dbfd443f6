"""Float64 NumPy/SciPy references, written from the formulas (not from the JAX code).

Each function takes NumPy arrays and works on one example at a time where that is clearer (loops
over the batch are fine at test sizes). `scipy.special.logsumexp` keeps the references finite at
large logits; it is an independent implementation of the same mathematical quantity.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special

lse = scipy.special.logsumexp


def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])


def zlpr_hard(logits, labels):
    """log(1 + Σ_neg e^s) + log(1 + Σ_pos e^-s), labels 0/1 (post 7359)."""
    out = []
    for s, t in zip(_rows(logits), _rows(labels)):
        pos, neg = s[t == 1], s[t == 0]
        out.append(lse(np.append(neg, 0.0)) + lse(np.append(-pos, 0.0)))
    return np.array(out).reshape(np.shape(logits)[:-1])


def zlpr_soft(logits, labels, mask=None):
    """log(1 + Σ t e^-s) + log(1 + Σ (1-t) e^s) over unmasked classes (post 9064)."""
    s_rows, t_rows = _rows(logits), _rows(labels)
    mask = np.ones(np.shape(logits)) if mask is None else np.broadcast_to(mask, np.shape(logits))
    m_rows = _rows(mask) > 0
    out = []
    for s, t, m in zip(s_rows, t_rows, m_rows):
        s, t = s[m], t[m]
        pos = lse(np.append(-s, 0.0), b=np.append(t, 1.0))
        neg = lse(np.append(s, 0.0), b=np.append(1.0 - t, 1.0))
        out.append(pos + neg)
    return np.array(out).reshape(np.shape(logits)[:-1])


def multi_hot(indices, num_classes, mask_zero=False):
    out = np.zeros(np.shape(indices)[:-1] + (num_classes,))
    flat_out = out.reshape(-1, num_classes)
    flat_idx = np.reshape(indices, (flat_out.shape[0], np.shape(indices)[-1]))
    for row, idx in zip(flat_out, flat_idx):
        row[idx] = 1.0
        if mask_zero:
            row[0] = 0.0
    return out


def cross_entropy(logits, labels):
    s = _rows(logits)
    y = np.reshape(labels, -1)
    return np.array([lse(r) - r[k] for r, k in zip(s, y)]).reshape(np.shape(labels))


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - lse(x, axis=-1, keepdims=True)


def softmax(x):
    return np.exp(log_softmax(x))


def flatnce(logits, labels):
    s, y = _rows(logits), np.reshape(labels, -1)
    return np.array([lse(np.delete(r, k)) - r[k] for r, k in zip(s, y)]).reshape(np.shape(labels))


def flatnce_grad(logits, labels):
    """d/ds of log ξ: softmax over the negatives, -1 at the positive."""
    s, y = _rows(logits), np.reshape(labels, -1)
    grads = []
    for r, k in zip(s, y):
        others = np.arange(r.size) != k
        g = np.zeros_like(r)
        g[others] = softmax(r[others])
        g[k] = -1.0
        grads.append(g)
    return np.array(grads).reshape(np.shape(logits))


def rdrop(logits1, logits2, labels, alpha):
    log_p1, log_p2 = log_softmax(logits1), log_softmax(logits2)
    p1, p2 = np.exp(log_p1), np.exp(log_p2)
    kl12 = np.sum(p1 * (log_p1 - log_p2), axis=-1)
    kl21 = np.sum(p2 * (log_p2 - log_p1), axis=-1)
    return cross_entropy(logits1, labels) + cross_entropy(logits2, labels) + alpha / 2 * (kl12 + kl21)


def focal(logits, labels, gamma, alpha=None):
    log_p_t = np.take_along_axis(log_softmax(logits), np.asarray(labels)[..., None], -1)[..., 0]
    a = 1.0 if alpha is None else (np.asarray(alpha)[labels] if np.ndim(alpha) else alpha)
    return -a * (1.0 - np.exp(log_p_t)) ** gamma * log_p_t


def logit_adjusted(logits, labels, prior, tau):
    return cross_entropy(np.asarray(logits, np.float64) + tau * np.log(prior), labels)


def smooth_accuracy(logits, labels):
    return -np.take_along_axis(softmax(logits), np.asarray(labels)[..., None], -1)[..., 0]


def gaussian_kl(mp, cp, mq, cq):
    d = len(mp)
    iq = np.linalg.inv(cq)
    diff = mq - mp
    return 0.5 * (np.trace(iq @ cp) + diff @ iq @ diff - d + np.log(np.linalg.det(cq) / np.linalg.det(cp)))


def gaussian_bhattacharyya(mp, cp, mq, cq):
    c = (cp + cq) / 2
    diff = mp - mq
    return diff @ np.linalg.inv(c) @ diff / 8 + 0.5 * np.log(
        np.linalg.det(c) / np.sqrt(np.linalg.det(cp) * np.linalg.det(cq))
    )


def gaussian_w2_squared(mp, cp, mq, cq):
    root_p = scipy.linalg.sqrtm(cp).real
    cross = scipy.linalg.sqrtm(root_p @ cq @ root_p).real
    return np.sum((mp - mq) ** 2) + np.trace(cp + cq - 2 * cross)


def exact_accuracy(logits, labels, sigma, margin=0.0):
    """EXACT's expected accuracy P[argmax(μ + σε) = y] (margin r on the rivals), float64: the integral over the
    target's noise t = ε_y of φ(t) Π_{j≠y} Φ((μ_y − μ_j − r)/σ + t), by scipy's adaptive quadrature."""
    from scipy import integrate, special

    logits = np.asarray(logits, np.float64)
    out = np.empty(logits.shape[:-1])
    for index in np.ndindex(*logits.shape[:-1]):
        mu, y = logits[index], int(labels[index])
        gaps = np.delete((mu[y] - mu - margin) / sigma, y)
        f = lambda t: np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi) * np.prod(special.ndtr(gaps + t))
        out[index] = integrate.quad(f, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
    return out
