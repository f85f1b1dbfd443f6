"""experiments/zlpr_vs_bce.py: label extraction without leakage, hashing, and metrics vs sklearn."""
import ast
import textwrap
import zlib

import numpy as np
import pytest
from sklearn.metrics import f1_score

from experiments import zlpr_vs_bce as experiment

SOURCE = textwrap.dedent('''
    import os.path
    import numpy as np
    from collections import OrderedDict as OD
    from . import sibling

    def load(path, *, encoding="utf-8"):
        import json
        data = json.loads(os.path.join(path, "x"))
        table = OD(sorted(data))
        return np.asarray(sibling.readFileName(table))
''')


def test_function_labels_are_the_used_modules_and_never_features():
    tree = ast.parse(SOURCE)
    module_level = experiment.module_aliases(tree.body)
    assert module_level == {"os": "os", "np": "numpy", "OD": "collections"}  # relative import skipped
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    tokens, labels = experiment.function_example(function, module_level)
    assert labels == {"os", "numpy", "collections", "json"}
    assert not {"os", "np", "OD", "json", "numpy", "collections"} & set(tokens)  # no label leaks
    assert {"load", "path", "encoding", "join", "loads", "asarray", "sibling", "readFileName"} <= set(tokens)
    assert {"~read", "~file", "~name"} <= set(tokens)  # camel-case pieces


def test_hashed_bag_is_deterministic_normalised_and_truncated():
    ids, weights = experiment.hashed_bag(["a", "b", "a", "c"], num_buckets=2**14, max_tokens=2)
    assert ids[0] == zlib.crc32(b"a") % 2**14  # most frequent first; CRC32, not Python's salted hash
    np.testing.assert_allclose(weights, np.log1p([2, 1]) / np.linalg.norm(np.log1p([2, 1])), rtol=1e-6)
    ids, weights = experiment.hashed_bag([], num_buckets=16, max_tokens=3)
    assert np.all(weights == 0)


def test_f1_scores_match_sklearn():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 7)) < 0.2).astype(np.float32)
    labels[:, 6] = 0  # a class without positives is left out of the macro average
    scores = rng.normal(size=(200, 7)) + 2 * labels - 1
    micro, macro = experiment.f1_scores(scores, labels)
    assert micro == pytest.approx(f1_score(labels, scores > 0, average="micro"))
    assert macro == pytest.approx(f1_score(labels, scores > 0, average="macro", labels=range(6)))


def test_expected_calibration_error_on_known_bins():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    y = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # bins: {0.05, 0.05} freq 0.5 -> |0.05-0.5|; {0.95, 0.95} freq 1 -> 0.05; {0.55, 0.55} -> 0.45
    want = (2 * 0.45 + 2 * 0.05 + 2 * 0.45) / 6
    assert experiment.expected_calibration_error(p, y, num_bins=10) == pytest.approx(want)


def test_config_variants():
    assert experiment.get_config().file_stride == 1
    assert experiment.get_config("quick").file_stride == 10
    with pytest.raises(ValueError, match="variant"):
        experiment.get_config("huge")
