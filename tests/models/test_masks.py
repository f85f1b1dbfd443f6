"""models.masks against brute-force boolean definitions written loop by loop from each kind's meaning.

The references share nothing with the module: they never form c = cumsum(segment ids) and decide every
(query, key) pair from the tokens' roles (source, target, padding), as UniLM (https://kexue.fm/archives/6933)
and UniAE (https://kexue.fm/archives/8475) describe them.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from models import masks

KINDS = ("bidirectional", "causal", "unilm", "uniae")


def _layouts(seed, batch=4, n=9, source_length=None):
    """Random rows [source | target | padding]: source ≥ 1 token (or `source_length` in every row), target
    and padding ≥ 0; the padding's segment id is 0 or 1 at random (pipelines pad segment ids either way).
    Returns roles `[batch][n]` ('src', 'tgt', 'pad'), segment ids and padding mask `[batch, n]`."""
    rng = np.random.default_rng(seed)
    roles, segments, valid = [], np.zeros((batch, n), np.int32), np.zeros((batch, n), bool)
    for b in range(batch):
        source = rng.integers(1, n + 1) if source_length is None else source_length
        target = rng.integers(0, n - source + 1)
        row = ["src"] * source + ["tgt"] * target + ["pad"] * (n - source - target)
        pad_segment = rng.integers(0, 2)
        roles.append(row)
        segments[b] = [{"src": 0, "tgt": 1, "pad": pad_segment}[r] for r in row]
        valid[b] = [r != "pad" for r in row]
    return roles, segments, valid


def _brute_force(kind, roles, segments, valid):
    """`[batch, n, n]`: may query q see key k, decided pair by pair."""
    batch, n = segments.shape
    out = np.zeros((batch, n, n), bool)
    for b in range(batch):
        for q in range(n):
            for k in range(n):
                if not valid[b, k]:
                    continue  # padding keys are hidden from every query
                rq, rk = roles[b][q], roles[b][k]
                if kind == "bidirectional":
                    seen = True
                elif kind == "causal":
                    seen = k <= q
                elif kind == "unilm":  # source: bidirectional; target: the source and targets up to itself
                    seen = rk == "src" or (rq == "tgt" and k <= q) or rq == "pad"
                else:  # uniae: the same segment only; source bidirectional, target causal
                    same = segments[b, q] == segments[b, k]
                    seen = same and (rk == "src" or rq == "pad" or k <= q)
                out[b, q, k] = seen
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_training_masks_equal_brute_force(kind, seed):
    roles, segments, valid = _layouts(seed)
    got = np.asarray(masks.mask_from_tokens(kind, segment_ids=jnp.asarray(segments), padding_mask=jnp.asarray(valid)))
    np.testing.assert_array_equal(got, _brute_force(kind, roles, segments, valid))


def test_the_four_kinds_differ_on_one_seq2seq_row():
    """A fixed layout where every kind gives a different mask (so no two kinds could be swapped)."""
    segments = jnp.array([[0, 0, 1, 1]])
    got = {kind: np.asarray(masks.mask_from_tokens(kind, segment_ids=segments)[0]).astype(int) for kind in KINDS}
    np.testing.assert_array_equal(got["uniae"], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(got["unilm"], [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(got["causal"], np.tril(np.ones((4, 4), int)))
    assert len({g.tobytes() for g in got.values()}) == 4


def test_without_segment_ids_every_kind_but_causal_is_bidirectional():
    valid = jnp.array([[True] * 5 + [False]])
    want = np.broadcast_to(np.asarray(valid)[:, None, :], (1, 6, 6))
    for kind in ("bidirectional", "unilm", "uniae"):
        np.testing.assert_array_equal(np.asarray(masks.mask_from_tokens(kind, padding_mask=valid)), want)
    np.testing.assert_array_equal(np.asarray(masks.mask_from_tokens("causal", shape=(2, 3))),
                                  np.broadcast_to(np.tril(np.ones((3, 3), bool)), (2, 3, 3)))


@pytest.mark.parametrize("kind", ["causal", "unilm", "uniae"])
@pytest.mark.parametrize("seed", range(3))
def test_decoding_masks_equal_rows_of_the_full_mask(kind, seed):
    """Decoding: the source in one call, then one token at a time, each against a cache of n slots of which
    only those written so far are valid; the slots not written yet hold garbage segment ids and counts. Every
    step's mask equals the full training mask's rows for its queries, unwritten slots included (no query of a
    causal kind sees a later key, and the source is written whole before any target)."""
    roles, segments, valid = _layouts(seed + 10, source_length=1 + seed)
    batch, n = segments.shape
    full = np.asarray(masks.mask_from_tokens(kind, segment_ids=jnp.asarray(segments), padding_mask=jnp.asarray(valid)))
    counts = np.asarray(masks.segment_counts(jnp.asarray(segments)))
    positions = np.broadcast_to(np.arange(n), (batch, n))
    garbage = np.random.default_rng(seed).integers(0, 5, size=(batch, n)).astype(np.int32)
    source = 1 + seed
    for start, stop in [(0, source)] + [(t, t + 1) for t in range(source, n)]:
        written = np.arange(n) < stop
        got = masks.make_mask(kind, query_segments=jnp.asarray(segments[:, start:stop]),
                              query_counts=jnp.asarray(counts[:, start:stop]),
                              query_positions=jnp.asarray(positions[:, start:stop]),
                              key_segments=jnp.asarray(np.where(written, segments, garbage)),
                              key_counts=jnp.asarray(np.where(written, counts, garbage)),
                              key_positions=jnp.asarray(positions), key_valid=jnp.asarray(written & valid))
        assert got.shape == (batch, stop - start, n)
        np.testing.assert_array_equal(np.asarray(got), full[:, start:stop])


def test_unknown_kinds_and_missing_shapes_are_one_line_errors():
    ids = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"unknown attention mask 'prefix'; expected one of \['bidirectional'"):
        masks.mask_from_tokens("prefix", segment_ids=ids)
    with pytest.raises(ValueError, match="unknown attention mask 'UniLM'"):
        masks.make_mask("UniLM", query_segments=ids, query_counts=ids, query_positions=ids, key_segments=ids,
                        key_counts=ids, key_positions=ids)
    with pytest.raises(ValueError, match=r"needs \[batch, n\] segment_ids or padding_mask, or shape"):
        masks.mask_from_tokens("unilm")
