"""experiments/siamese_collapse.py end to end at its quick size: a cell trains through the trainer, is probed
and lands in the table with the baselines."""
import json

from experiments import siamese_collapse


def test_quick_study_writes_its_table(tmp_path):
    config = siamese_collapse.get_config("quick")
    config.workdir = str(tmp_path)
    config.cells = ("byol_closed_form",)  # an EMA target and the solved predictor: the most code in one cell
    text = siamese_collapse.run(config)
    assert "| raw pixels |" in text and "| untrained network |" in text
    assert "| byol_closed_form | yes | closed form | 0.99 | SGD |" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cells"]) == {"byol_closed_form"}
    assert results["baselines"]["raw pixels"]["linear_probe_accuracy"] > 0.9  # digits are nearly linearly separable
    assert (tmp_path / "results.md").read_text().startswith("| cell |")
