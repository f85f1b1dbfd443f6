"""The fine-tuning studies end to end at their quick sizes (random encoders, a few steps): every method and
condition trains, is tested and lands in the tables (slow: `make test-slow`)."""
import pytest

from experiments import conditional_generation, few_shot_sentiment

pytestmark = pytest.mark.slow


def test_few_shot_study_writes_its_tables(tmp_path):
    config = few_shot_sentiment.get_config("quick")
    config.workdir = str(tmp_path)
    text = few_shot_sentiment.run(config)
    for method in config.methods:
        assert f"| {method} |" in text
    assert "| ce |" in text and (tmp_path / "results.md").exists() and (tmp_path / "results.json").exists()


def test_conditional_generation_study_writes_its_table(tmp_path):
    config = conditional_generation.get_config("quick")
    config.workdir = str(tmp_path)
    text = conditional_generation.run(config)
    for condition in config.conditions:
        assert f"| {condition} |" in text
    assert "The judge" in text and (tmp_path / "samples.md").read_text().count("asked") == 3 * 2 * config.shown
