"""Batched, jitted decoding with a key/value cache: greedy, beam search (bert4keras') and sampling.

One model call encodes every input's left-padded prefix `[batch, P]`, filling a cache of P + T slots; then each
of at most T steps feeds one token per row, which attends to the whole fixed-size cache under a mask of
`models.masks`: every step does the same work (attention over all P + T slots) at any position. A UniLM seq2seq
model (Su, "从语言模型到Seq2Seq:Transformer如戏,全靠Mask", https://kexue.fm/archives/6933) decodes with mask
'unilm', the prefix `[CLS] source [SEP]` in segment 0 and the target in segment 1; a causal LM with 'causal',
everything in segment 0.

Cache slots (`_Slots`): prefix slot j has segment s_j (0 at padding), count c = cumsum(s) and position
cumsum(valid) − 1 (0 at padding), so left padding never shifts a row's positions (BERT's learned table sees an
unpadded row's ids); generated token t (slot P + t) has segment `target_segment`, the count continuing the
row's cumsum and position n_valid + t. A slot is a visible key once written, unless it is padding.

Every loop is a `lax.while_loop` that stops once every input is done, with the same work per step. Outputs:
`tokens` `[b, T]` hold `end_id` after a row's end, `lengths` count the end token, `scores` are summed
log-probabilities (log-softmax of the logits after `logits_processor`).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from models import masks as masks_lib

__all__ = ["AllowOnlyAtFirstStep", "CachedLM", "DecodeResult", "ForbidTokens", "TokenHealer",
           "allow_only_at_first_step", "beam_search", "benchmark_decoding", "filter_logits", "forbid_tokens",
           "gnmt_length_penalty", "greedy", "left_pad", "sample", "seq2seq_prefix"]


@dataclasses.dataclass(frozen=True)
class CachedLM:
    """A model as decoding sees it (the adaptors live with the models, e.g. `TextModel.cached_lm`).

    init_cache(batch, max_length) → an all-zero cache pytree; each leaf is a scalar (the running index) or an
      array with one batch axis (found by comparing the shapes for batch 1 and 2, so a layer axis in front, as
      `models.gau`'s `scan_layers` puts, is fine).
    apply(params, cache, tokens `[b, n]` int32, *, segment_ids `[b, n]`, position_ids `[b, n]`,
      attention_mask `[b, n, max_length]` bool) → (logits `[b, n, vocab]` float32, new cache); it writes the
      n tokens' keys/values at the cache's own running index.
    Keep one instance per model: it is a static jit argument, so a new one compiles again.
    """

    init_cache: Callable[[int, int], Any]
    apply: Callable[..., tuple[jax.Array, Any]]


@flax.struct.dataclass
class DecodeResult:
    """The best sequence per input (`sample`: per draw), and for beam search every final beam, best first."""

    tokens: jax.Array  # [b, T] int32, end_id after the end
    lengths: jax.Array  # [b] int32, the end token included (T if none)
    scores: jax.Array  # [b] float32 summed log-probabilities
    steps: jax.Array  # () int32 decoding steps run (< T when every input ended early)
    beam_tokens: jax.Array | None = None  # [b, beam_size, T]
    beam_lengths: jax.Array | None = None  # [b, beam_size]
    beam_scores: jax.Array | None = None  # [b, beam_size] summed log-probabilities; −inf: no hypothesis


# ---------------------------------------------------------------- logits processors

@flax.struct.dataclass
class ForbidTokens:
    """Never choose `ids` `[n]`: their logits are −inf at every step."""

    ids: jax.Array

    def __call__(self, step, generated, logits):
        del step, generated
        return logits.at[:, self.ids].set(-jnp.inf)


@flax.struct.dataclass
class AllowOnlyAtFirstStep:
    """At step 0 only tokens with `allowed` `[b, V]` True may be chosen (token healing's first-token constraint).

    Rows are input-major (beam search and `num_samples` give each input several consecutive rows), so the
    mask of input i applies to rows i·m … i·m + m − 1.
    """

    allowed: jax.Array

    def __call__(self, step, generated, logits):
        del generated
        allowed = jnp.repeat(self.allowed, logits.shape[0] // self.allowed.shape[0], axis=0)
        return jnp.where((step > 0) | allowed, logits, -jnp.inf)


def forbid_tokens(ids: Sequence[int]) -> ForbidTokens:
    return ForbidTokens(jnp.asarray(ids, jnp.int32))


def allow_only_at_first_step(allowed) -> AllowOnlyAtFirstStep:
    return AllowOnlyAtFirstStep(jnp.asarray(allowed, bool))


class TokenHealer:
    """Token healing (Su, "大词表语言模型在续写任务上的一个问题及对策", https://kexue.fm/archives/9762; Guidance's
    `token_healing`): a prompt cut inside a word ends on a token that rarely ends a word in training, so back off
    the prompt's last token and let the model choose, at the first step, any token whose text begins with the
    removed text (the removed token itself among them). With the first-step constraint of
    `allow_only_at_first_step(healer.allowed_mask(removed))` any decoder heals; the continuation is the
    generated text after the removed text.

    `token_bytes[i]`: the UTF-8 bytes token i adds to the decoded text, None for special tokens (a tokenizer's
    `token_bytes()`); matching bytes, not characters, lets a byte-level vocabulary heal too (where only the
    removed byte itself qualifies, so healing changes nothing).
    """

    def __init__(self, token_bytes: Sequence[bytes | None]):
        self.token_bytes = list(token_bytes)
        self.vocab_size = len(self.token_bytes)
        self._order = sorted((b, i) for i, b in enumerate(self.token_bytes) if b)
        self._sorted = [b for b, _ in self._order]
        self._cache: dict[bytes, np.ndarray] = {}

    def extending(self, text: bytes) -> np.ndarray:
        """Ids of the tokens whose bytes begin with `text` (sorted by their bytes, which keeps them contiguous)."""
        import bisect

        if text not in self._cache:
            lo = bisect.bisect_left(self._sorted, text)
            hi = lo
            while hi < len(self._sorted) and self._sorted[hi].startswith(text):
                hi += 1
            self._cache[text] = np.asarray([i for _, i in self._order[lo:hi]], np.int32)
        return self._cache[text]

    def heal(self, prompt: Sequence[int], *, keep: int = 1) -> tuple[list[int], bytes]:
        """(the prompt without its last token, that token's bytes); unchanged, with b"", when the prompt has no more
        than `keep` tokens (e.g. a [CLS] to keep) or ends on a special token."""
        prompt = [int(t) for t in prompt]
        if len(prompt) <= keep or not self.token_bytes[prompt[-1]]:
            return prompt, b""
        return prompt[:-1], self.token_bytes[prompt[-1]]

    def allowed_mask(self, removed: Sequence[bytes]) -> np.ndarray:
        """`[len(removed), V]` bool: per row, the tokens a healed first step may choose (all, where nothing was
        removed)."""
        mask = np.zeros((len(removed), self.vocab_size), bool)
        for row, text in enumerate(removed):
            if text:
                mask[row, self.extending(text)] = True
            else:
                mask[row] = True
        return mask


def _split_processor(processor):
    """(array leaves, static rest): a processor's arrays are traced, so a new mask does not recompile; any
    other leaf (a plain function, Python numbers) becomes part of the static jit key."""
    leaves, treedef = jax.tree.flatten(processor)
    dynamic = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    arrays = [x for x, d in zip(leaves, dynamic) if d]
    return arrays, (treedef, tuple(None if d else x for x, d in zip(leaves, dynamic)))


def _join_processor(arrays, static):
    treedef, leaves = static
    arrays = iter(arrays)
    return treedef.unflatten([next(arrays) if x is None else x for x in leaves])


# ---------------------------------------------------------------- host-side inputs

def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens `[b, P]` int32, valid `[b, P]` bool) with each sequence right-aligned (P = the longest).

    >>> tokens, valid = left_pad([[5, 6], [7]], pad_id=0)
    >>> tokens.tolist(), valid.tolist()
    ([[5, 6], [0, 7]], [[True, True], [False, True]])
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError(f"left_pad: sequences must be a non-empty list of non-empty token lists, got lengths "
                         f"{[len(s) for s in sequences]}")
    width = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), width), pad_id, np.int32)
    valid = np.zeros((len(sequences), width), bool)
    for i, s in enumerate(sequences):
        tokens[i, width - len(s):], valid[i, width - len(s):] = s, True
    return tokens, valid


def seq2seq_prefix(sources: Sequence[Sequence[int]], pad_id: int,
                   targets: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UniLM prefixes (tokens, valid, segments) `[b, P]`: each source (already `[CLS] … [SEP]`) in segment 0,
    then an optional start of its target in segment 1 (decode the rest with target_segment=1), left-padded."""
    targets = targets if targets is not None else [[] for _ in sources]
    if len(targets) != len(sources):
        raise ValueError(f"seq2seq_prefix: {len(sources)} sources but {len(targets)} targets")
    tokens, valid = left_pad([list(s) + list(t) for s, t in zip(sources, targets)], pad_id)
    segments = np.zeros_like(tokens)
    for i, t in enumerate(targets):
        segments[i, tokens.shape[1] - len(t):] = 1 if t else 0
    return tokens, valid, segments


# ---------------------------------------------------------------- formulas

def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits `[..., V]` with every token outside the top_k (0: all) and then outside the nucleus set to −inf.

    The nucleus (Holtzman et al., *The Curious Case of Neural Text Degeneration*, arXiv 1904.09751) keeps the
    most probable tokens until their probability (renormalised after top-k) reaches top_p: a token stays iff
    the mass of the tokens before it is < top_p, as bert4keras' `random_sample` (so the best always stays).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jax.lax.top_k(logits, logits.shape[-1])[0]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def gnmt_length_penalty(lengths: jax.Array, alpha: float) -> jax.Array:
    """lp(len) = ((5 + len) / 6)^α (Wu et al., *Google's Neural Machine Translation System*, arXiv 1609.08144);
    finished hypotheses are ranked by log p / lp(len); α = 0 ranks by log p."""
    return ((5.0 + lengths) / 6.0) ** alpha


# ---------------------------------------------------------------- cache slots and model calls

@flax.struct.dataclass
class _Slots:
    """Segment, segment count and position of every cache slot `[rows, P + T]`; which prefix slots are tokens."""

    segments: jax.Array
    counts: jax.Array
    positions: jax.Array
    prefix_valid: jax.Array  # [rows, P]

    def mask(self, kind: str, start: int | jax.Array, n: int) -> jax.Array:
        """`[rows, n, P + T]`: slots start … start + n − 1 as queries against every slot written by then."""
        prefix = self.prefix_valid.shape[1]
        query = lambda x: jax.lax.dynamic_slice_in_dim(x, start, n, axis=1)  # noqa: E731
        written = jnp.arange(self.segments.shape[1] - prefix) < start + n - prefix
        key_valid = jnp.concatenate([self.prefix_valid, jnp.broadcast_to(written, (len(self.segments),
                                                                                    written.shape[0]))], axis=1)
        return masks_lib.make_mask(kind, query_segments=query(self.segments), query_counts=query(self.counts),
                                   query_positions=query(self.positions), key_segments=self.segments,
                                   key_counts=self.counts, key_positions=self.positions, key_valid=key_valid)


def _slots(prefix_valid, prefix_segments, target_segment: int, max_new_tokens: int) -> _Slots:
    valid = prefix_valid.astype(bool)
    batch = valid.shape[0]
    segments = jnp.concatenate([jnp.where(valid, prefix_segments, 0).astype(jnp.int32),
                                jnp.full((batch, max_new_tokens), target_segment, jnp.int32)], axis=1)
    n_valid = jnp.sum(valid, axis=1, keepdims=True, dtype=jnp.int32)
    positions = jnp.concatenate([jnp.where(valid, jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0),
                                 n_valid + jnp.arange(max_new_tokens, dtype=jnp.int32)], axis=1)
    return _Slots(segments, masks_lib.segment_counts(segments), positions, valid)


def _feed(lm: CachedLM, params, cache, slots: _Slots, kind: str, tokens, start):
    """Runs tokens `[rows, n]` (slots start … start + n − 1) through the model: (last logits `[rows, V]`, cache)."""
    n = tokens.shape[1]
    at = lambda x: jax.lax.dynamic_slice_in_dim(x, start, n, axis=1)  # noqa: E731
    logits, cache = lm.apply(params, cache, tokens.astype(jnp.int32), segment_ids=at(slots.segments),
                             position_ids=at(slots.positions), attention_mask=slots.mask(kind, start, n))
    return logits[:, -1].astype(jnp.float32), cache


def _batch_axes(lm: CachedLM, max_length: int) -> list[int | None]:
    """The batch axis of each cache leaf (flattened order), None for leaves without one (the index)."""
    small, large = (jax.tree.leaves(jax.eval_shape(lambda b=b: lm.init_cache(b, max_length))) for b in (1, 2))
    axes = []
    for one, two in zip(small, large):
        differ = [i for i, (p, q) in enumerate(zip(one.shape, two.shape)) if p != q]
        if len(one.shape) != len(two.shape) or len(differ) > 1:
            raise ValueError(f"CachedLM.init_cache: a cache leaf has shape {one.shape} for batch 1 and {two.shape} "
                             "for batch 2; expected one batch axis (or a scalar)")
        axes.append(differ[0] if differ else None)
    return axes


def _map_batch(fn, cache, axes):
    leaves, treedef = jax.tree.flatten(cache)
    return treedef.unflatten([x if a is None else fn(x, a) for x, a in zip(leaves, axes)])


def _encode(lm, params, prefix, prefix_valid, prefix_segments, *, mask_kind, target_segment, max_new_tokens,
            repeats):
    """Encodes the prefix once, then repeats each row `repeats` times: (logits, cache, slots, cache batch axes)."""
    batch, length = prefix.shape
    slots = _slots(prefix_valid, prefix_segments, target_segment, max_new_tokens)
    logits, cache = _feed(lm, params, lm.init_cache(batch, length + max_new_tokens), slots, mask_kind, prefix, 0)
    axes = _batch_axes(lm, length + max_new_tokens)
    if repeats > 1:
        cache = _map_batch(lambda x, a: jnp.repeat(x, repeats, axis=a), cache, axes)
        logits = jnp.repeat(logits, repeats, axis=0)
        slots = jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0), slots)
    return logits, cache, slots, axes


# ---------------------------------------------------------------- greedy and sampling

_STATIC = ("lm", "processor_static", "mask_kind", "target_segment", "max_new_tokens", "end_id")


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_samples", "sampling"))
def _sequential(lm, params, prefix, prefix_valid, prefix_segments, processor_arrays, rng, *, processor_static,
                mask_kind, target_segment, max_new_tokens, end_id, num_samples, sampling):
    """Greedy (sampling None) or sampling ((temperature, top_k, top_p)) of max_new_tokens tokens per row."""
    processor = _join_processor(processor_arrays, processor_static)
    logits, cache, slots, _ = _encode(lm, params, prefix, prefix_valid, prefix_segments, mask_kind=mask_kind,
                                      target_segment=target_segment, max_new_tokens=max_new_tokens,
                                      repeats=num_samples)
    rows, length = logits.shape[0], prefix.shape[1]

    def body(carry):
        t, tokens, lengths, scores, done, logits, cache, rng = carry
        if processor is not None:
            logits = processor(t, tokens, logits)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        rng, key = jax.random.split(rng)
        if sampling is None:
            token = jnp.argmax(log_probs, axis=-1)
        else:
            temperature, top_k, top_p = sampling
            token = jax.random.categorical(key, filter_logits(logits / temperature, top_k=top_k, top_p=top_p))
        token = jnp.where(done, end_id, token).astype(jnp.int32)
        scores = scores + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0])
        lengths = jnp.where(done, lengths, t + 1)
        done = done | (token == end_id)
        logits, cache = _feed(lm, params, cache, slots, mask_kind, token[:, None], length + t)
        return t + 1, tokens.at[:, t].set(token), lengths, scores, done, logits, cache, rng

    carry = (jnp.int32(0), jnp.full((rows, max_new_tokens), end_id, jnp.int32), jnp.zeros(rows, jnp.int32),
             jnp.zeros(rows, jnp.float32), jnp.zeros(rows, bool), logits, cache, rng)
    carry = jax.lax.while_loop(lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[4]), body, carry)
    return DecodeResult(tokens=carry[1], lengths=carry[2], scores=carry[3], steps=carry[0])


# ---------------------------------------------------------------- beam search

def _hypotheses(tokens, scores, lengths, alpha):
    """(tokens `[b, n, T]`, scores, rank = score / lp(length), lengths `[b, n]`): beams as beam search compares them."""
    return tokens, scores, scores / gnmt_length_penalty(lengths, alpha), lengths


def _best(hypotheses, k):
    """The k best `_hypotheses` of each input by rank, best first."""
    order = jax.lax.top_k(hypotheses[2], k)[1]
    return tuple(jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1) for x in hypotheses)


def _where_rows(flag, new, old):
    """new where flag `[b]` is True, else old (arrays `[b, ...]`)."""
    return jnp.where(flag.reshape((-1,) + (1,) * (jnp.ndim(old) - 1)), new, old)


def _merge(pool, new):
    """The best len(pool) of pool ∪ new (`_hypotheses`)."""
    return _best(tuple(jnp.concatenate(pair, axis=1) for pair in zip(pool, new)), pool[2].shape[1])


def _extend(s, candidates, t, end_id):
    """The top-k (over beams × vocab) of candidates `[b, K, V]`: (scores, parent beams, tokens, new tokens, ends)."""
    b, k, v = candidates.shape
    top, index = jax.lax.top_k(candidates.reshape(b, k * v), k)
    parent, token = index // v, (index % v).astype(jnp.int32)
    tokens = jnp.take_along_axis(s["tokens"], parent[..., None], axis=1).at[:, :, t].set(token)
    ends = jnp.take_along_axis(s["ends"], parent, axis=1) + (token == end_id)
    return top, parent, token, tokens, ends


def _bert4keras_step(s, candidates, t, *, end_id, min_ends, max_new_tokens, alpha):
    """bert4keras' step: keep the top `width`; stop if the best has ended, else drop the ended and shrink."""
    del max_new_tokens, alpha
    top, parent, token, tokens, ends = _extend(s, candidates, t, end_id)
    top = jnp.where(jnp.arange(top.shape[1]) < s["width"][:, None], top, -jnp.inf)
    finished = (token == end_id) & (ends >= min_ends) & (top > -jnp.inf)
    stop = finished[:, 0] | (top[:, 0] == -jnp.inf)  # top_k sorts: beam 0 is the best
    answer = (tokens, top, top, jnp.full_like(ends, t + 1))
    new = dict(tokens=tokens, scores=jnp.where(finished, -jnp.inf, top), ends=ends, done=stop,
               width=s["width"] - jnp.sum(finished, axis=1, dtype=jnp.int32),
               pool=tuple(_where_rows(stop, x, old) for x, old in zip(answer, s["pool"])))
    return new, parent, token


def _pool_step(s, candidates, t, *, end_id, min_ends, max_new_tokens, alpha):
    """Ended hypotheses leave the beam for a pool of the best beam_size; stop when no live beam can beat it."""
    finishing = (jnp.arange(candidates.shape[-1]) == end_id) & (s["ends"][..., None] + 1 >= min_ends)
    top, parent, token, tokens, ends = _extend(s, jnp.where(finishing, -jnp.inf, candidates), t, end_id)
    ended = jnp.where(finishing[..., end_id], candidates[..., end_id], -jnp.inf)
    pool = _merge(s["pool"], _hypotheses(s["tokens"].at[:, :, t].set(end_id), ended, jnp.full_like(ends, t + 1),
                                         alpha))
    # Log-probabilities only fall and lp only grows, so no live beam ends above top / lp(T).
    bound = top[:, 0] / gnmt_length_penalty(jnp.float32(max_new_tokens), alpha)
    new = dict(tokens=tokens, scores=top, ends=ends, width=s["width"], done=pool[2][:, 0] >= bound, pool=pool)
    return new, parent, token


@functools.partial(jax.jit, static_argnames=_STATIC + ("beam_size", "min_ends", "keep_finished", "alpha"))
def _beam(lm, params, prefix, prefix_valid, prefix_segments, processor_arrays, *, processor_static, mask_kind,
          target_segment, max_new_tokens, end_id, beam_size, min_ends, keep_finished, alpha):
    processor = _join_processor(processor_arrays, processor_static)
    logits, cache, slots, axes = _encode(lm, params, prefix, prefix_valid, prefix_segments, mask_kind=mask_kind,
                                         target_segment=target_segment, max_new_tokens=max_new_tokens,
                                         repeats=beam_size)
    (b, length), k, total = prefix.shape, beam_size, max_new_tokens
    if not 0 <= end_id < logits.shape[-1]:
        raise ValueError(f"beam_search: end_id {end_id} is not a token id of the vocabulary of {logits.shape[-1]}")
    step = functools.partial(_pool_step if keep_finished else _bert4keras_step, end_id=end_id, min_ends=min_ends,
                             max_new_tokens=total, alpha=alpha)
    empty = jnp.full((b, k), -jnp.inf)
    state = dict(tokens=jnp.full((b, k, total), end_id, jnp.int32), scores=empty.at[:, 0].set(0.0),
                 ends=jnp.zeros((b, k), jnp.int32), width=jnp.full((b,), k, jnp.int32), done=jnp.zeros(b, bool),
                 # the answer: the beams when bert4keras stopped; or the pool of ended hypotheses (keep_finished)
                 pool=(jnp.full((b, k, total), end_id, jnp.int32), empty, empty, jnp.zeros((b, k), jnp.int32)))

    def body(carry):
        t, s, logits, cache = carry
        if processor is not None:
            logits = processor(t, s["tokens"].reshape(b * k, total), logits)
        candidates = s["scores"][..., None] + jax.nn.log_softmax(logits, axis=-1).reshape(b, k, -1)
        new, parent, token = step(s, candidates, t)
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        cache = _map_batch(lambda x, a: jnp.take(x, rows, axis=a), cache, axes)
        logits, cache = _feed(lm, params, cache, slots, mask_kind, token.reshape(-1, 1), length + t)
        return t + 1, jax.tree.map(lambda old, x: _where_rows(s["done"], old, x), s, new), logits, cache

    t, s, _, _ = jax.lax.while_loop(lambda c: (c[0] < total) & ~jnp.all(c[1]["done"]), body,
                                    (jnp.int32(0), state, logits, cache))
    # Inputs still running at T: their live beams are cut there (and compete with the pool, keep_finished).
    running = _hypotheses(s["tokens"], s["scores"], jnp.full((b, k), total, jnp.int32), alpha)
    running = _merge(s["pool"], running) if keep_finished else running
    answer = tuple(_where_rows(s["done"], p, x) for p, x in zip(s["pool"], running))
    tokens, scores, _, lengths = _best(answer, k)
    return DecodeResult(tokens=tokens[:, 0], lengths=lengths[:, 0], scores=scores[:, 0], steps=t,
                        beam_tokens=tokens, beam_lengths=lengths, beam_scores=scores)


# ---------------------------------------------------------------- public entry points

def _check(prefix, prefix_valid, prefix_segments, *, mask_kind, target_segment, max_new_tokens, **positive):
    shapes = {np.shape(prefix), np.shape(prefix_valid), np.shape(prefix_segments)}
    if len(shapes) != 1 or len(np.shape(prefix)) != 2:
        raise ValueError(f"decoding: prefix, prefix_valid and prefix_segments must share one [batch, P] shape, got "
                         f"{np.shape(prefix)}, {np.shape(prefix_valid)}, {np.shape(prefix_segments)}")
    if not isinstance(prefix_valid, jax.core.Tracer) and not np.all(np.asarray(prefix_valid)[:, -1]):
        raise ValueError("decoding: every row's last prefix slot must be a token (prefix_valid[:, -1] all True): "
                         "pad prefixes on the LEFT (left_pad)")
    if mask_kind not in masks_lib.MASKS:
        raise ValueError(f"decoding: mask_kind {mask_kind!r} is not one of {sorted(masks_lib.MASKS)}")
    if target_segment not in (0, 1):
        raise ValueError(f"decoding: target_segment must be 0 (causal LM) or 1 (UniLM target), got {target_segment}")
    for name, value in dict(max_new_tokens=max_new_tokens, **positive).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"decoding: {name} must be an integer ≥ 1, got {value!r}")


def greedy(lm: CachedLM, params, prefix, prefix_valid, prefix_segments, *, mask_kind: str, target_segment: int,
           max_new_tokens: int, end_id: int, logits_processor=None) -> DecodeResult:
    """The argmax token at every step, for every row of a left-padded prefix `[b, P]` (module docstring).

    logits_processor(step, generated `[b, T]` (end_id past step), logits `[b, V]`) → logits, applied before the
    choice; a pytree processor (`forbid_tokens`, `allow_only_at_first_step`) has its arrays traced.
    """
    _check(prefix, prefix_valid, prefix_segments, mask_kind=mask_kind, target_segment=target_segment,
           max_new_tokens=max_new_tokens)
    arrays, static = _split_processor(logits_processor)
    return _sequential(lm, params, prefix, prefix_valid, prefix_segments, arrays, jax.random.PRNGKey(0),
                       processor_static=static, mask_kind=mask_kind, target_segment=target_segment,
                       max_new_tokens=max_new_tokens, end_id=end_id, num_samples=1, sampling=None)


def sample(lm: CachedLM, params, prefix, prefix_valid, prefix_segments, *, rng: jax.Array, mask_kind: str,
           target_segment: int, max_new_tokens: int, end_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, num_samples: int = 1, logits_processor=None) -> DecodeResult:
    """num_samples draws per input from softmax(filter_logits(logits / temperature)) (bert4keras'
    `random_sample`); the prefix is encoded once and its cache repeated. Rows are input-major: `tokens`
    `[b · num_samples, T]`, row i · num_samples + j is draw j of input i. `scores` sum the log-probabilities
    before temperature and filtering (after `logits_processor`), comparable with `greedy`'s."""
    _check(prefix, prefix_valid, prefix_segments, mask_kind=mask_kind, target_segment=target_segment,
           max_new_tokens=max_new_tokens, num_samples=num_samples)
    if not temperature > 0 or not 0 < top_p <= 1 or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sample: need temperature > 0, 0 < top_p ≤ 1 and an integer top_k ≥ 0 (0: off), got "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
    arrays, static = _split_processor(logits_processor)
    return _sequential(lm, params, prefix, prefix_valid, prefix_segments, arrays, rng, processor_static=static,
                       mask_kind=mask_kind, target_segment=target_segment, max_new_tokens=max_new_tokens,
                       end_id=end_id, num_samples=num_samples, sampling=(float(temperature), top_k, float(top_p)))


def beam_search(lm: CachedLM, params, prefix, prefix_valid, prefix_segments, *, mask_kind: str, target_segment: int,
                max_new_tokens: int, end_id: int, beam_size: int, length_penalty: float = 0.0, min_ends: int = 1,
                keep_finished: bool = False, logits_processor=None) -> DecodeResult:
    """Beam search over cumulative log-probabilities, batched over inputs (`beam_*` fields: every final beam).

    Default: bert4keras' `AutoRegressiveDecoder.beam_search` (bert4keras/snippets.py; Su, "如何应对Seq2Seq中的
    '根本停不下来'问题", https://kexue.fm/archives/7500, for min_ends): each step keeps the top beam_size of
    beams × vocab; a beam ends when it emits its min_ends-th end token; if the best beam has ended, return it,
    else drop the ended beams and keep that many fewer from then on (here: −inf slots); at T return the best
    live beam. That is not exact search: a dropped ended beam may beat the answer.

    keep_finished=True: ended hypotheses go to a pool of the best beam_size, ranked by log p / lp(len) with
    lp = `gnmt_length_penalty` (α = length_penalty ≥ 0); the beam keeps beam_size live beams; stop once the
    best pooled hypothesis ranks above any a live beam could reach; beams cut at T join the pool. With
    beam_size ≥ V^(T−1) this is exhaustive search. length_penalty needs keep_finished: bert4keras' beams all
    have one length, where any lp leaves the order unchanged.
    """
    _check(prefix, prefix_valid, prefix_segments, mask_kind=mask_kind, target_segment=target_segment,
           max_new_tokens=max_new_tokens, beam_size=beam_size, min_ends=min_ends)
    if length_penalty < 0 or (length_penalty and not keep_finished):
        raise ValueError(f"beam_search: length_penalty must be ≥ 0 and needs keep_finished=True, got "
                         f"length_penalty={length_penalty}, keep_finished={keep_finished}")
    arrays, static = _split_processor(logits_processor)
    return _beam(lm, params, prefix, prefix_valid, prefix_segments, arrays, processor_static=static,
                 mask_kind=mask_kind, target_segment=target_segment, max_new_tokens=max_new_tokens, end_id=end_id,
                 beam_size=beam_size, min_ends=min_ends, keep_finished=bool(keep_finished),
                 alpha=float(length_penalty))


# ---------------------------------------------------------------- measurements

def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def benchmark_decoding(lm: CachedLM, params, *, vocab_size: int, cache_lengths: Sequence[int] = (32, 512),
                       batch_size: int = 8, steps: int = 16, beam_size: int = 4, beam_prefix: int = 32,
                       repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Decoding speed of a model (e.g. `TextModel.cached_lm()`) on random UniLM prefixes; measurements, not tests.

    decode_step_ms_cache_{L}: one cached step of batch_size tokens against L cache slots (median of `repeats`
    runs of `steps` jitted steps, / steps); beam{K}_sequences_per_s: beam search of batch_size prefixes of
    beam_prefix tokens, `steps` new tokens each (token 0 is the end and forbidden: every beam runs to the end).
    """
    rng = np.random.default_rng(seed)
    tokens = lambda n: jnp.asarray(rng.integers(1, vocab_size, (batch_size, n)), jnp.int32)  # noqa: E731
    results = {}
    for cache_length in cache_lengths:
        prefix = tokens(cache_length - steps)
        encoded = jax.jit(functools.partial(_encode, lm, mask_kind="unilm", target_segment=1, max_new_tokens=steps,
                                            repeats=1))(params, prefix, jnp.ones_like(prefix, bool), 0 * prefix)[:3]
        run = jax.jit(functools.partial(_greedy_steps, lm, steps=steps))
        results[f"decode_step_ms_cache_{cache_length}"] = 1e3 * _median_seconds(lambda: run(params, *encoded),
                                                                                 repeats) / steps
    prefix = tokens(beam_prefix)
    decode = lambda: beam_search(lm, params, prefix, jnp.ones_like(prefix, bool), 0 * prefix,  # noqa: E731
                                 mask_kind="unilm", target_segment=1, max_new_tokens=steps, end_id=0,
                                 beam_size=beam_size, logits_processor=forbid_tokens([0])).tokens
    results[f"beam{beam_size}_sequences_per_s"] = batch_size / _median_seconds(decode, repeats)
    return results


def _greedy_steps(lm, params, logits, cache, slots, *, steps):
    """`steps` cached greedy UniLM steps after an encoded prefix (the timed part of `benchmark_decoding`)."""
    body = lambda t, c: _feed(lm, params, c[1], slots, "unilm", jnp.argmax(c[0], -1)[:, None],  # noqa: E731
                              slots.prefix_valid.shape[1] + t)
    return jax.lax.fori_loop(0, steps, body, (logits, cache))[0]
