"""train_lib.text.decoding against NumPy references: a toy cached LM whose next-token distribution depends on the
whole history (one attention layer over the cache), brute force over every sequence, a NumPy copy of bert4keras'
beam loop, and the real TransformerEncoder's full forward pass without a cache."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import masks as masks_lib
from models import transformer as transformer_lib
from train_lib.text import decoding

DIM, MAX_POSITIONS, END = 8, 32, 0


# ---------------------------------------------------------------- the toy model and its NumPy twin

def toy_params(seed: int, vocab: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    shapes = dict(tok=(vocab, DIM), seg=(2, DIM), pos=(MAX_POSITIONS, DIM), q=(DIM, DIM), k=(DIM, DIM),
                  v=(DIM, DIM), out=(DIM, vocab), bigram=(vocab, vocab))
    return {name: r.normal(size=shape) for name, shape in shapes.items()}


def _toy_init_cache(batch, max_length):
    # values carry a leading layer axis, as models.gau's scan_layers cache does: the batch is found on axis 1
    return {"index": jnp.zeros((), jnp.int32), "keys": jnp.zeros((batch, max_length, DIM)),
            "values": jnp.zeros((1, batch, max_length, DIM))}


def _toy_apply(params, cache, tokens, *, segment_ids, position_ids, attention_mask):
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    x = p["tok"][tokens] + p["seg"][segment_ids] + p["pos"][position_ids]
    index = cache["index"]
    keys = jax.lax.dynamic_update_slice(cache["keys"], x @ p["k"], (0, index, 0))
    values = jax.lax.dynamic_update_slice(cache["values"], (x @ p["v"])[None], (0, 0, index, 0))
    scores = jnp.einsum("bqd,bkd->bqk", x @ p["q"], keys) / np.sqrt(DIM)
    weights = jax.nn.softmax(jnp.where(attention_mask, scores, -jnp.inf), axis=-1)
    logits = jnp.tanh(jnp.einsum("bqk,bkd->bqd", weights, values[0])) @ p["out"] + p["bigram"][tokens]
    return logits, {"index": index + tokens.shape[1], "keys": keys, "values": values}


TOY = decoding.CachedLM(init_cache=_toy_init_cache, apply=_toy_apply)


def toy_log_probs(params, tokens, segments) -> np.ndarray:
    """float64 log p(next | tokens) for one unpadded row: its last token attends to every token (under 'unilm'
    or 'causal' the last token of a sequence sees all of it)."""
    tokens, segments = np.asarray(tokens), np.asarray(segments)
    x = params["tok"][tokens] + params["seg"][segments] + params["pos"][np.arange(len(tokens))]
    scores = (x[-1] @ params["q"]) @ (x @ params["k"]).T / np.sqrt(DIM)
    weights = np.exp(scores - scores.max())
    logits = np.tanh((weights / weights.sum()) @ (x @ params["v"])) @ params["out"] + params["bigram"][tokens[-1]]
    return logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()


def log_probs_fn(params, prefix, target_segment=1, forbid=(), allowed_first=None):
    """generated tokens → float64 log-probs of the next, renormalised over the tokens a processor leaves."""
    def fn(generated):
        segments = [0] * len(prefix) + [target_segment] * len(generated)
        lp = toy_log_probs(params, list(prefix) + list(generated), segments)
        keep = np.ones_like(lp, bool)
        keep[list(forbid)] = False
        if allowed_first is not None and not generated:
            keep &= allowed_first
        lp = np.where(keep, lp, -np.inf)
        return lp - np.log(np.sum(np.exp(lp[keep])))
    return fn


def np_greedy(log_probs, steps):
    generated, score = [], 0.0
    while len(generated) < steps and (not generated or generated[-1] != END):
        lp = log_probs(generated)
        generated.append(int(np.argmax(lp)))
        score += lp[generated[-1]]
    return generated, score


def np_bert4keras_beam(log_probs, topk, steps, min_ends):
    """bert4keras/snippets.py `AutoRegressiveDecoder.beam_search`, line for line (minlen 1, exact log-probs).
    Returns the answer and the beams it was chosen from: {tuple(tokens): score}."""
    output_ids, output_scores = np.zeros((1, 0), int), np.zeros(1)
    beams = lambda: {tuple(int(t) for t in ids): s for ids, s in zip(output_ids, output_scores)}  # noqa: E731
    for _ in range(steps):
        scores = output_scores.reshape((-1, 1)) + np.stack([log_probs(list(ids)) for ids in output_ids])
        indices = scores.argpartition(-topk, axis=None)[-topk:]
        indices_1, indices_2 = indices // scores.shape[1], (indices % scores.shape[1]).reshape((-1, 1))
        output_ids = np.concatenate([output_ids[indices_1], indices_2], 1)
        output_scores = np.take_along_axis(scores, indices, axis=None)
        is_end = output_ids[:, -1] == END
        end_counts = (output_ids == END).sum(1)
        best = output_scores.argmax()
        if is_end[best] and end_counts[best] >= min_ends:
            return list(output_ids[best]), output_scores[best], beams()
        flag = ~is_end | (end_counts < min_ends)
        if not flag.all():
            output_ids, output_scores, topk = output_ids[flag], output_scores[flag], flag.sum()
    best = output_scores.argmax()
    return list(output_ids[best]), output_scores[best], beams()


def np_pool_beam(log_probs, vocab, beam_size, steps, min_ends, alpha):
    """keep_finished beam search, plainly: beams_size live beams; ended ones join a pool of the best beam_size
    by log p / lp(len); stop when the pool's best ranks ≥ the best live score / lp(steps). {tokens: score}."""
    lp = lambda n: ((5 + n) / 6) ** alpha  # noqa: E731
    live, pool = [(0.0, ())], []
    for t in range(steps):
        candidates = []
        for score, tokens in live:
            log_p = log_probs(list(tokens))
            for v in range(vocab):
                seq, total = tokens + (v,), score + log_p[v]
                if v == END and seq.count(END) >= min_ends:
                    pool.append((total / lp(t + 1), seq, total))
                else:
                    candidates.append((total, seq))
        live, pool = sorted(candidates, reverse=True)[:beam_size], sorted(pool, reverse=True)[:beam_size]
        if pool and pool[0][0] >= live[0][0] / lp(steps):
            return {seq: total for _, seq, total in pool}
    pool = sorted(pool + [(total / lp(steps), seq, total) for total, seq in live], reverse=True)[:beam_size]
    return {seq: total for _, seq, total in pool}


def np_exhaustive(log_probs, vocab, steps, alpha):
    """The best of every sequence that ends at END or at `steps`, by log p / ((5 + len) / 6)^α."""
    best = (-np.inf, None, None)

    def grow(generated, score):
        nonlocal best
        lp = log_probs(generated)
        for v in range(vocab):
            seq, total = generated + [v], score + lp[v]
            if v == END or len(seq) == steps:
                rank = total / ((5 + len(seq)) / 6) ** alpha
                best = max(best, (rank, seq, total), key=lambda b: b[0])
            else:
                grow(seq, total)

    grow([], 0.0)
    return best[1], best[2]


PREFIXES = [[1, 2, 3], [4], [2, 5, 1, 3, 4], [3, 3]]


def batch(prefixes):
    tokens, valid = decoding.left_pad(prefixes, pad_id=5)
    return tokens, valid, np.zeros_like(tokens)


def row(result, i):
    n = int(result.lengths[i])
    return [int(t) for t in result.tokens[i, :n]], float(result.scores[i])


def assert_same(result, i, expected_tokens, expected_score):
    tokens, score = row(result, i)
    assert tokens == expected_tokens, (i, tokens, expected_tokens)
    np.testing.assert_allclose(score, expected_score, atol=2e-4)
    assert np.all(np.asarray(result.tokens[i, len(tokens):]) == END)


def beam_dict(result, i):
    """{tokens: score} of input i's hypotheses (−inf slots left out)."""
    return {tuple(int(t) for t in result.beam_tokens[i, k, :int(result.beam_lengths[i, k])]):
            float(result.beam_scores[i, k]) for k in np.flatnonzero(np.isfinite(np.asarray(result.beam_scores[i])))}


@pytest.fixture(scope="module")
def models6():
    return [toy_params(seed, 6) for seed in (2, 5)]  # rows that end at different steps, or never


# ---------------------------------------------------------------- greedy, sampling, processors

def test_greedy_equals_numpy_argmax_loop(models6):
    for params in models6:
        result = decoding.greedy(TOY, params, *batch(PREFIXES), mask_kind="unilm", target_segment=1,
                                 max_new_tokens=6, end_id=END)
        for i, prefix in enumerate(PREFIXES):
            assert_same(result, i, *np_greedy(log_probs_fn(params, prefix), 6))


def test_causal_lm_greedy_equals_numpy(models6):
    params = models6[0]
    result = decoding.greedy(TOY, params, *batch(PREFIXES), mask_kind="causal", target_segment=0,
                             max_new_tokens=5, end_id=END)
    for i, prefix in enumerate(PREFIXES):
        assert_same(result, i, *np_greedy(log_probs_fn(params, prefix, target_segment=0), 5))


def test_forbid_tokens_and_first_step_mask_are_obeyed(models6):
    params, forbid = models6[1], (2, 3)
    allowed = np.random.default_rng(3).random((len(PREFIXES), 6)) < 0.5
    allowed[:, 1] = True
    for processor, kwargs in ((decoding.forbid_tokens(forbid), dict(forbid=forbid)),
                              (decoding.allow_only_at_first_step(allowed), None)):
        result = decoding.greedy(TOY, params, *batch(PREFIXES), mask_kind="unilm", target_segment=1,
                                 max_new_tokens=6, end_id=END, logits_processor=processor)
        for i, prefix in enumerate(PREFIXES):
            extra = kwargs if kwargs is not None else dict(allowed_first=allowed[i])
            assert_same(result, i, *np_greedy(log_probs_fn(params, prefix, **extra), 6))
    beams = decoding.beam_search(TOY, params, *batch(PREFIXES), mask_kind="unilm", target_segment=1, max_new_tokens=4,
                                 end_id=END, beam_size=3, logits_processor=decoding.allow_only_at_first_step(allowed))
    live = np.isfinite(np.asarray(beams.beam_scores))
    first = np.asarray(beams.beam_tokens[:, :, 0])
    assert np.all(np.take_along_axis(allowed, first, axis=1)[live])


def test_plain_function_processor_and_early_stop(models6):
    def end_at_step_two(step, generated, logits):
        del generated
        forced = jnp.where(jnp.arange(logits.shape[-1]) == END, 0.0, -jnp.inf)
        return jnp.where(step >= 2, forced, logits.at[:, END].set(-jnp.inf))

    for decode in (decoding.greedy, lambda *a, **k: decoding.beam_search(*a, beam_size=2, **k)):
        result = decode(TOY, models6[0], *batch(PREFIXES), mask_kind="unilm", target_segment=1, max_new_tokens=8,
                        end_id=END, logits_processor=end_at_step_two)
        assert int(result.steps) == 3
        np.testing.assert_array_equal(result.lengths, 3)
        assert np.all(np.asarray(result.tokens[:, 2:]) == END) and np.all(np.asarray(result.tokens[:, :2]) != END)


def test_sampling_with_top_k_1_is_greedy_for_every_draw(models6):
    params = models6[0]
    want = decoding.greedy(TOY, params, *batch(PREFIXES), mask_kind="unilm", target_segment=1, max_new_tokens=6,
                           end_id=END)
    got = decoding.sample(TOY, params, *batch(PREFIXES), rng=jax.random.PRNGKey(1), mask_kind="unilm",
                          target_segment=1, max_new_tokens=6, end_id=END, temperature=0.7, top_k=1, num_samples=3)
    np.testing.assert_array_equal(got.tokens, np.repeat(want.tokens, 3, axis=0))
    np.testing.assert_allclose(got.scores, np.repeat(want.scores, 3), atol=1e-5)


def np_filter(logits, top_k, top_p):
    """bert4keras' random_sample filtering in float64: top-k, renormalise, drop tokens after the mass reaches p."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_k:
        probs = np.where(probs >= np.sort(probs, -1)[:, [-top_k]], probs, 0)
        probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, -1)
    ordered = np.take_along_axis(probs, order, -1)
    flag = np.roll(np.cumsum(ordered, -1) >= top_p, 1, axis=1)
    flag[:, 0] = False
    ordered[flag] = 0
    np.put_along_axis(probs, order, ordered, -1)
    return probs / probs.sum(-1, keepdims=True)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.6), (3, 1.0), (4, 0.7), (1, 0.3), (0, 1.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, 10)) * 2
    got = decoding.filter_logits(jnp.asarray(logits, jnp.float32), top_k=top_k, top_p=top_p)
    np.testing.assert_allclose(jax.nn.softmax(got, axis=-1), np_filter(logits, top_k, top_p), atol=1e-5)


def test_sampled_first_tokens_follow_the_filtered_distribution(models6):
    params, draws = models6[0], 4000
    tokens, valid, segments = batch(PREFIXES[:1])
    got = decoding.sample(TOY, params, tokens, valid, segments, rng=jax.random.PRNGKey(0), mask_kind="unilm",
                          target_segment=1, max_new_tokens=1, end_id=END, temperature=0.8, top_k=4, top_p=0.9,
                          num_samples=draws)
    logits = log_probs_fn(params, PREFIXES[0])([]) / 0.8
    frequencies = np.bincount(np.asarray(got.tokens[:, 0]), minlength=6) / draws
    np.testing.assert_allclose(frequencies, np_filter(logits[None], 4, 0.9)[0], atol=0.03)


def test_sample_scores_are_the_log_probs_of_the_drawn_sequences(models6):
    params = models6[1]
    got = decoding.sample(TOY, params, *batch(PREFIXES), rng=jax.random.PRNGKey(2), mask_kind="unilm",
                          target_segment=1, max_new_tokens=5, end_id=END, num_samples=2)
    for r in range(len(PREFIXES) * 2):
        tokens, score = row(got, r)
        assert (tokens[-1] == END) == (len(tokens) < 5) and END not in tokens[:-1]
        log_probs = log_probs_fn(params, PREFIXES[r // 2])
        np.testing.assert_allclose(score, sum(log_probs(tokens[:j])[t] for j, t in enumerate(tokens)), atol=2e-4)


# ---------------------------------------------------------------- beam search

def test_beam_size_one_is_greedy(models6):
    args = dict(mask_kind="unilm", target_segment=1, max_new_tokens=6, end_id=END)
    want = decoding.greedy(TOY, models6[1], *batch(PREFIXES), **args)
    got = decoding.beam_search(TOY, models6[1], *batch(PREFIXES), beam_size=1, **args)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


@pytest.mark.parametrize("beam_size,min_ends", [(2, 1), (3, 1), (5, 1), (3, 2)])
def test_beam_search_equals_bert4keras_loop(models6, beam_size, min_ends):
    """The answer, and the (shrunk) beam it was chosen from, equal bert4keras' on two random toy models."""
    for params in models6:
        got = decoding.beam_search(TOY, params, *batch(PREFIXES), mask_kind="unilm", target_segment=1,
                                   max_new_tokens=6, end_id=END, beam_size=beam_size, min_ends=min_ends)
        for i, prefix in enumerate(PREFIXES):
            tokens, score, beams = np_bert4keras_beam(log_probs_fn(params, prefix), beam_size, 6, min_ends)
            assert_same(got, i, tokens, score)
            got_beams = beam_dict(got, i)
            assert got_beams.keys() == beams.keys(), (i, got_beams, beams)
            np.testing.assert_allclose([got_beams[b] for b in beams], list(beams.values()), atol=2e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_exhaustive_beam_finds_the_best_sequence(alpha):
    vocab, steps = 4, 4
    prefixes = [[1, 2], [3], [2, 2, 1]]
    for seed in (5, 11):  # best sequences of every length, and α changes some
        params = toy_params(seed, vocab)
        got = decoding.beam_search(TOY, params, *batch(prefixes), mask_kind="unilm", target_segment=1,
                                   max_new_tokens=steps, end_id=END, beam_size=vocab ** (steps - 1),
                                   keep_finished=True, length_penalty=alpha)
        for i, prefix in enumerate(prefixes):
            assert_same(got, i, *np_exhaustive(log_probs_fn(params, prefix), vocab, steps, alpha))


@pytest.mark.parametrize("beam_size,min_ends,alpha", [(2, 1, 0.0), (3, 2, 0.0), (3, 1, 0.8)])
def test_keep_finished_beams_equal_numpy(models6, beam_size, min_ends, alpha):
    """Every returned hypothesis (the pool, joined at T by the live beams) equals the plain NumPy algorithm's."""
    params = models6[0]
    got = decoding.beam_search(TOY, params, *batch(PREFIXES), mask_kind="unilm", target_segment=1, max_new_tokens=5,
                               end_id=END, beam_size=beam_size, min_ends=min_ends, keep_finished=True,
                               length_penalty=alpha)
    for i, prefix in enumerate(PREFIXES):
        want = np_pool_beam(log_probs_fn(params, prefix), 6, beam_size, 5, min_ends, alpha)
        got_beams = beam_dict(got, i)
        assert got_beams.keys() == want.keys(), (i, got_beams, want)
        np.testing.assert_allclose([got_beams[b] for b in want], list(want.values()), atol=2e-4)
        best = max(want, key=lambda b: want[b] / ((5 + len(b)) / 6) ** alpha)
        assert_same(got, i, list(best), want[best])


def test_bad_arguments_raise_one_line_errors():
    args = dict(mask_kind="unilm", target_segment=1, max_new_tokens=3, end_id=END)
    with pytest.raises(ValueError, match="beam_size must be an integer ≥ 1"):
        decoding.beam_search(TOY, {}, *batch([[1]]), beam_size=0, **args)
    with pytest.raises(ValueError, match="needs keep_finished=True"):
        decoding.beam_search(TOY, {}, *batch([[1]]), beam_size=2, length_penalty=0.6, **args)
    with pytest.raises(ValueError, match="mask_kind 'bert'"):
        decoding.greedy(TOY, {}, *batch([[1]]), **{**args, "mask_kind": "bert"})
    with pytest.raises(ValueError, match="pad prefixes on the LEFT"):
        decoding.greedy(TOY, {}, np.ones((1, 3), np.int32), np.array([[True, True, False]]), np.zeros((1, 3)), **args)
    with pytest.raises(ValueError, match="non-empty token lists"):
        decoding.left_pad([[1], []], 0)


def test_seq2seq_prefix_puts_targets_in_segment_one():
    tokens, valid, segments = decoding.seq2seq_prefix([[7, 1, 8], [7, 8]], pad_id=0, targets=[[], [4, 5]])
    np.testing.assert_array_equal(tokens, [[0, 7, 1, 8], [7, 8, 4, 5]])
    np.testing.assert_array_equal(valid, [[0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(segments, [[0, 0, 0, 0], [0, 0, 1, 1]])


# ---------------------------------------------------------------- the real TransformerEncoder

def transformer_lm(module) -> decoding.CachedLM:
    def init_cache(batch_size, max_length):
        tokens = jnp.zeros((batch_size, max_length), jnp.int32)
        shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, decode=True))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))

    def apply(params, cache, tokens, *, segment_ids, position_ids, attention_mask):
        out, variables = module.apply({"params": params, "cache": cache}, tokens, segment_ids=segment_ids,
                                      position_ids=position_ids, attention_mask=attention_mask, decode=True,
                                      heads=("mlm",), mutable=["cache"])
        return out["mlm_logits"], variables["cache"]

    return decoding.CachedLM(init_cache, apply)


def random_params(module, seed):
    """N(0, 0.3²) weights and 1 ± 0.1 norm scales from NumPy (compiling flax's initialisers costs seconds)."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    r = np.random.default_rng(seed)

    def draw(path, shape):
        noise = r.normal(size=shape.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.3 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


# end ids chosen so that the rows of these random models end at different steps, or not at all
@pytest.mark.parametrize("position,mask_kind,targets,end", [
    ("rope", "unilm", None, 14), ("learned", "unilm", [[], [4, 8], [6]], 9),  # a started target: causal in the prefix
    pytest.param("learned", "causal", None, 9, marks=pytest.mark.slow)])
def test_cached_transformer_greedy_equals_full_forward_passes(position, mask_kind, targets, end):
    """KV-cache decoding of left-padded rows = argmax of the full forward pass of each row alone, step by step."""
    cfg = transformer_lib.TransformerConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2,
                                            intermediate_size=32, max_positions=MAX_POSITIONS, position=position,
                                            dropout_rate=0.0, attention_dropout_rate=0.0)
    module = transformer_lib.TransformerEncoder(cfg)
    params = random_params(module, seed=0)
    sources, steps, target_segment = [[2, 9, 14], [2, 5, 21, 7, 11, 3], [2, 17, 3, 26]], 6, 0
    if mask_kind == "unilm":
        target_segment, targets = 1, targets or [[] for _ in sources]
    tokens, valid, segments = decoding.seq2seq_prefix(sources, pad_id=0, targets=targets)
    got = decoding.greedy(transformer_lm(module), params, tokens, valid, segments, mask_kind=mask_kind,
                          target_segment=target_segment, max_new_tokens=steps, end_id=end)

    width = tokens.shape[1] + steps  # each row alone, right-padded to one shape, no cache

    @jax.jit
    def full_log_probs(tokens, segments, valid):
        mask = masks_lib.mask_from_tokens(mask_kind, segment_ids=segments, padding_mask=valid)
        out = module.apply({"params": params}, tokens, segment_ids=segments, attention_mask=mask, heads=("mlm",))
        return jax.nn.log_softmax(out["mlm_logits"], axis=-1)

    for i, source in enumerate(sources):
        started = targets[i] if targets else []
        generated, score = [], 0.0
        while len(generated) < steps and (not generated or generated[-1] != end):
            seq = source + started + generated
            segments = [0] * len(source) + [target_segment] * (len(started) + len(generated))
            pad = width - len(seq)
            lp = np.asarray(full_log_probs(jnp.asarray([seq + [0] * pad]), jnp.asarray([segments + [0] * pad]),
                                           jnp.asarray([[True] * len(seq) + [False] * pad])))[0, len(seq) - 1]
            generated.append(int(np.argmax(lp)))
            score += lp[generated[-1]]
        assert row(got, i)[0] == generated, (i, row(got, i)[0], generated)
        np.testing.assert_allclose(row(got, i)[1], score, atol=1e-4)
