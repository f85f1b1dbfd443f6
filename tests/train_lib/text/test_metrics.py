"""Character ROUGE-L and exact match against brute force."""
import itertools

import hypothesis
import hypothesis.strategies as st
import pytest

from train_lib.text import metrics


def brute_force_lcs(a: str, b: str) -> int:
    """The longest subsequence of `a` (by trying every one) that is also a subsequence of `b`."""
    def is_subsequence(s, t):
        it = iter(t)
        return all(c in it for c in s)
    for size in range(len(a), 0, -1):
        if any(is_subsequence(c, b) for c in itertools.combinations(a, size)):
            return size
    return 0


@hypothesis.given(st.text(alphabet="ab晨星c", max_size=7), st.text(alphabet="ab晨星c", max_size=7))
def test_lcs_matches_brute_force(a, b):
    assert metrics.lcs_length(a, b) == brute_force_lcs(a, b)


def test_rouge_l_by_hand():
    # LCS("abcd", "abed") = "abd", P = R = 3/4
    assert metrics.rouge_l("abcd", "abed") == pytest.approx(0.75)
    # P = 2/2, R = 2/4 → F = 2·1·0.5/1.5
    assert metrics.rouge_l("晨星", "寥若晨星") == pytest.approx(2 / 3)
    assert metrics.rouge_l("", "abc") == 0.0 and metrics.rouge_l("x y", "xy") == 1.0


def test_generation_scores():
    scores = metrics.generation_scores(["晨星", "ab", "q"], ["晨星", "abc", "z"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l"] == pytest.approx((1 + 0.8 + 0) / 3)
    with pytest.raises(ValueError, match="as many predictions"):
        metrics.generation_scores(["a"], ["a", "b"])
