"""Model FLOP counting (closed form vs jaxpr count vs hand counts), MFU logging and the benchmark CLI."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ddpm_digits
from models.gau import GAUConfig, GAULanguageModel
from tests.train_lib.conftest import TEST_OVERRIDES, cli_overrides, make_config, read_metrics, run_cli
from train_lib import flops, registry, trainer
from train_lib.lm import flops as lm_flops
from train_lib.lm.task import LanguageModelTask


@pytest.mark.parametrize("attention", ["gau", "flash", "performer"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [64, 100])  # 100: FLASH/Performer pad the last chunk of 32
def test_lm_closed_form_equals_the_jaxpr_count(attention, causal, length):
    cfg = GAUConfig(num_layers=2, embed_dim=32, key_dim=16, chunk_size=32, attention=attention, causal=causal,
                    performer_features=24)
    model = GAULanguageModel(cfg)
    tokens = jax.ShapeDtypeStruct((2, length), jnp.int32)
    params = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
    counted = flops.count_matmul_flops(lambda p, t: model.apply({"params": nn.unbox(p)}, t), params, tokens)
    assert counted == pytest.approx(2 * length * lm_flops.lm_forward_flops_per_token(cfg, length), rel=1e-9)


def test_gau_closed_form_by_hand():
    # d=4, e=8, s=2, n=3, V=5, one layer: projections 2(4·16 + 4·2 + 8·4) = 208, attention 2·3·2 + 2·3·8 = 60,
    # output layer 2·4·5 = 40.
    cfg = GAUConfig(num_layers=1, embed_dim=4, key_dim=2, vocab_size=5)
    assert lm_flops.lm_forward_flops_per_token(cfg, 3) == 208 + 60 + 40


def test_jaxpr_count_of_dots_convolutions_and_scans():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2))
    assert flops.count_matmul_flops(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), a, b) == 2 * 3 * 5 * 7 * 2
    image, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count_matmul_flops(conv, image, kernel) == 2 * (2 * 8 * 8 * 16) * (3 * 3 * 3)
    grouped = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", feature_group_count=3,  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count_matmul_flops(grouped, image, jnp.ones((3, 3, 1, 6))) == 2 * (2 * 4 * 4 * 6) * (3 * 3 * 1)
    m = jnp.ones((4, 4))

    def scanned(x):
        return jax.lax.scan(lambda c, _: (jax.checkpoint(lambda y: jax.jit(lambda z: z @ m)(y))(c), None), x,
                            None, length=5)[0]

    assert flops.count_matmul_flops(scanned, m) == 5 * 2 * 4 * 4 * 4


def test_unet_count_is_three_forwards_and_covers_its_edge_convolutions():
    """The diffusion task's step count (TaskBase's default: 3× the loss's count) is 3× its U-Net forward count,
    which exceeds the U-Net's input and output convolutions counted by hand (convolution counting itself is
    checked exactly above)."""
    config = ddpm_digits.get_config("tiny")
    task = registry.make_task(config)
    counted = task.forward_flops(4)
    # tiny: 8 channels, mults (1, 2) on 8×8 → input conv 1→8 and output conv 8→1 alone at 8×8:
    edge = 2 * 4 * 64 * 9 * (1 * 8 + 8 * 1)
    assert counted > edge and task.model_flops_per_step() == pytest.approx(3 * task.forward_flops(config.batch_size))


def test_mfu_and_peak():
    assert flops.mfu(2e9, 0.5, 8e9) == pytest.approx(0.5)
    assert np.isnan(flops.mfu(1.0, 0.0, 1.0))
    assert flops.peak_matmul_flops("float32") == 1e11  # the tests' KEXUE_PEAK_FLOPS
    flops.peak_matmul_flops.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(flops.PEAK_FLOPS_ENV)
        measured = flops.peak_matmul_flops("float32", min_seconds=0.0, repeats=1)  # a 1024² matmul
    flops.peak_matmul_flops.cache_clear()
    assert 1e8 < measured < 1e16 and measured != 1e11


def test_trainer_logs_mfu(tmp_path):
    trainer.train_and_evaluate(make_config(total_steps=3, log_every_steps=3), str(tmp_path))
    mfu = read_metrics(tmp_path)[-1]["mfu"]
    assert 0.0 < mfu < 1.5


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_benchmark_cli_reports_step_time_flops_and_mfu():
    overrides = [a for a in cli_overrides() if not a.startswith("--config.total_steps")]
    result = run_cli(["--config=experiments/gau_lm.py:tiny,flash", "--steps=2", "--warmup=0", *overrides],
                     devices=2, module="train_lib.benchmark")
    assert result.returncode == 0, result.stderr[-2000:]
    out = _last_json(result.stdout)
    task = registry.make_task(make_config(model__attention="flash", model__norm="scalenorm"))
    assert out["model_flops_per_step"] == pytest.approx(task.model_flops_per_step())
    assert out["tokens_per_sec"] == pytest.approx(TEST_OVERRIDES["batch_size"] * 32 / (out["step_ms"] / 1e3))
    assert out["mfu"] == pytest.approx(out["model_flops_per_step"] / (out["step_ms"] / 1e3) / out["peak_flops"])
    assert out["devices"] == 2 and out["mesh"] == {"data": 2, "fsdp": 1, "model": 1}
    assert out["peak_memory_bytes"] > 0 and "MFU" in result.stdout


def test_benchmark_ab_mode_alternates_a_second_config_and_reports_the_ratio():
    overrides = [a for a in cli_overrides() if not a.startswith("--config.total_steps")]
    result = run_cli(["--config=experiments/gau_lm.py:tiny", "--steps=2", "--warmup=0", *overrides,
                      "--ab=model.num_layers=1; model.attention='flash'"], devices=1, module="train_lib.benchmark")
    assert result.returncode == 0, result.stderr[-2000:]
    out = _last_json(result.stdout)
    assert out["ab_overrides"] == {"model.num_layers": 1, "model.attention": "flash"}
    assert out["ab_step_ms"] > 0 and out["ab_ratio"] == pytest.approx(out["ab_step_ms"] / out["step_ms"])
    assert "A/B" in result.stdout and "B/A" in result.stdout
    bad = run_cli(["--config=experiments/gau_lm.py:tiny", "--ab=model.num_layer=1"], devices=1,
                  module="train_lib.benchmark")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --ab: cannot apply 'model.num_layer=1'")


def test_compile_only_reports_compile_time_and_memory_and_scan_with_remat_saves_memory(monkeypatch):
    """`--compile_only` compiles A and B from shapes alone (no data read, no state allocated). B = scanned,
    rematerialised layers: each layer's activations are recomputed inside the backward scan, so the step needs
    less memory than the unrolled stack that keeps them all."""
    from train_lib import benchmark

    def no_data(*args, **kwargs):
        raise AssertionError("--compile_only read data")
    monkeypatch.setattr(LanguageModelTask, "datasets", no_data)
    config = make_config(model__num_layers=4, batch_size=32, data__seq_len=128)
    before = {id(a) for a in jax.live_arrays()}
    result = benchmark.compile_train_step(config, name="tiny", ab_overrides={"model.scan_layers": True,
                                                                             "model.remat": True})
    allocated = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
    assert allocated < 1024  # the PRNG key at most: the 0.4M-parameter state was never created
    assert result["compile_s"] > 0 and result["ab_compile_s"] > 0 and "step_ms" not in result
    assert result["model_flops_per_step"] == pytest.approx(registry.make_task(config).model_flops_per_step())
    assert 0 < result["ab_peak_memory_bytes"] < 0.7 * result["peak_memory_bytes"]
    table = benchmark.format_compile_table(result)
    assert "compile (not run)" in table and "model.scan_layers=True" in table


@pytest.mark.slow  # the step-time CLI itself is in test_benchmark_cli_reports_step_time_flops_and_mfu
def test_benchmark_cli_times_the_diffusion_sampler_too(monkeypatch):
    monkeypatch.setenv("KEXUE_XLA_DEFAULTS", "1")  # XLA accepts the diffusion task's CPU flags
    result = run_cli(["--config=experiments/ddpm_digits.py:tiny", "--steps=1", "--warmup=0", "--sample_steps=2",
                      "--sample_batch=8"], devices=1, module="train_lib.benchmark")
    assert result.returncode == 0, result.stderr[-2000:]
    out = _last_json(result.stdout)
    assert out["images_per_sec"] > 0 and out["sample_step_ms"] > 0 and out["sample_batch_size"] == 8
    config = ddpm_digits.get_config("tiny")
    assert out["images_per_sec"] == pytest.approx(config.batch_size / (out["step_ms"] / 1e3))
    assert out["sample_images_per_sec"] == pytest.approx(8 / (out["sample_step_ms"] / 1e3))
    assert out["model_flops_per_step"] == pytest.approx(registry.make_task(config).model_flops_per_step())


def test_benchmark_cli_rejects_bad_flags_in_one_line():
    result = run_cli(["--config=experiments/gau_lm.py:tiny", "--steps=0"], devices=1, module="train_lib.benchmark")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --steps")


def test_flash_speed_study_runs_and_flash_memory_does_not_grow_with_length():
    from experiments import flash_speed

    from train_lib import config_lib

    recorder = config_lib.ReadRecorder(flash_speed.get_config("quick"))
    table, results = flash_speed.run(recorder.config)
    assert recorder.unread() == []  # every key of the study's config was used
    memory = {(r["model"], r["seq_len"]): r["peak_memory_bytes"] for r in results}
    assert "| flash | 128 |" in table and "| gau | 64 |" in table
    # Same tokens per step: quadratic GAU's n×n scores double from n=64 to 128, FLASH's chunks stay C×C.
    assert memory[("gau", 128)] / memory[("gau", 64)] > memory[("flash", 128)] / memory[("flash", 64)]


def test_xla_defaults_per_task_respect_the_user_and_the_opt_out():
    from train_lib import xla_flags

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    diffusion = registry.task_class("diffusion").xla_cpu_flags
    flags_now = xla_flags.apply_defaults(diffusion, env)
    assert flags_now.startswith("--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=")
    assert xla_flags.apply_defaults(diffusion, env) == flags_now  # idempotent
    assert xla_flags.apply_defaults(registry.task_class("lm").xla_cpu_flags, {"XLA_FLAGS": ""}) == ""
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    assert xla_flags.apply_defaults(diffusion, mine) == mine["XLA_FLAGS"]
    assert xla_flags.apply_defaults(diffusion, {"KEXUE_XLA_DEFAULTS": "0"}) == ""


def test_peer_comparison_derives_the_peers_mfu_from_the_same_flops_and_peak():
    # tests/peers/compare.py runs without PyTorch in this venv; only its arithmetic is tested here.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "peers" / "compare.py"
    spec = importlib.util.spec_from_file_location("peer_compare", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    # 64.4 GFLOP per 4,096 tokens, peak 160 GFLOP/s: ours 5,600 tokens/s, the peer 6,600 tokens/s.
    flops_per_token, peak = 64.4e9 / 4096, 160e9
    ours, peer = 5600.0, 6600.0
    our_mfu = flops_per_token * ours / peak
    assert compare.peer_mfu(our_mfu, ours, peer) == pytest.approx(flops_per_token * peer / peak, rel=1e-12)
    table = compare.markdown_table("tokens", "peer 1.0", [peer], [ours], [our_mfu])
    assert "| 1 | 6,600 | 5,600 | 0.85× | 65% | 55% |" in table
