"""Generation metrics of the text family: character ROUGE-L and exact match.

ROUGE-L (Lin, *ROUGE: A Package for Automatic Evaluation of Summaries*, ACL 2004 workshop) with β = 1: with
L = the longest common subsequence of prediction p and reference r (over characters, spaces ignored, as the
Chinese title-generation scripts of bert4keras score),
    P = L / |p|,  R = L / |r|,  F = 2PR / (P + R)   (0 when L = 0).
"""
from __future__ import annotations


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of `a` and `b` (dynamic programming, O(|a|·|b|))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for ca in a:
        current = [0]
        for j, cb in enumerate(b):
            current.append(previous[j] + 1 if ca == cb else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Character ROUGE-L F1 of one prediction (whitespace removed from both).

    >>> rouge_l("晨星", "晨星")
    1.0
    >>> round(rouge_l("abcd", "abed"), 4)
    0.75
    """
    p, r = "".join(prediction.split()), "".join(reference.split())
    common = lcs_length(p, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{'rouge_l': mean character ROUGE-L F1, 'exact_match': fraction equal after whitespace removal}."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (≥ 1), got {len(predictions)} and {len(references)}")
    same = ["".join(p.split()) == "".join(r.split()) for p, r in zip(predictions, references)]
    return {"rouge_l": sum(map(rouge_l, predictions, references)) / len(references),
            "exact_match": sum(same) / len(references)}
