"""train_lib.pods without libtpu: reading collectives from HLO text, the roofline, the chip table, and the
errors a --topology run gives. (The compiles themselves are tests/pods, `make test-pods`.)"""
import pytest

from train_lib import pods
from train_lib.config_lib import ConfigError

HLO = """
HloModule jit_train_step, entry_computation_layout={...}

%fused_computation (param_0.1: bf16[48,256]) -> bf16[768,256] {
  %param_0.1 = bf16[48,256]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %all-gather.14 = bf16[768,256]{1,0:T(8,128)(2,1)} all-gather(%param_0.1), channel_id=62, dimensions={0}
}

ENTRY %main (p0: f32[1024,768], p1: f32[16]) -> f32[] {
  %all-reduce.151 = (bf16[1536,768]{1,0:T(8,128)(2,1)S(1)}, /*index=1*/f32[768]{0:T(1024)}) all-reduce(%a, %b), channel_id=1, to_apply=%add
  %all-reduce-start.2 = f32[16]{0} all-reduce-start(f32[16]{0} %p1), channel_id=2, to_apply=%add
  %all-reduce-done.2 = f32[16]{0} all-reduce-done(f32[16]{0} %all-reduce-start.2)
  %collective-permute-start.38 = (bf16[1,48,128]{2,1,0}, bf16[1,48,128]{2,1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=9, source_target_pairs={{0,1},{1,0}}
  %collective-permute-done.38 = bf16[1,48,128]{2,1,0} collective-permute-done(%collective-permute-start.38)
  %rs-start = ((f32[64,8]{1,0}), f32[4,8]{1,0}) async-start(f32[64,8]{1,0} %y), calls=%reduce-scatter.7
  %rs-done = f32[4,8]{1,0} async-done(%rs-start), calls=%reduce-scatter.7
  %fusion.3 = bf16[768,256]{1,0} fusion(%z), kind=kLoop, calls=%fused_computation
  %add.1 = f32[1024,768]{1,0} add(%p0, %p0), metadata={op_name="all-reduce(not one)"}
  ROOT %r = f32[] reduce(%p0, %c), dimensions={0,1}, to_apply=%add
}
"""


def test_collectives_are_counted_once_with_the_bytes_they_produce():
    found = pods.collectives(HLO)
    assert found["all-reduce"] == {"count": 2, "bytes": 1536 * 768 * 2 + 768 * 4 + 16 * 4}
    assert found["all-gather"] == {"count": 1, "bytes": 768 * 256 * 2}  # inside a fusion: counted where it is
    assert found["collective-permute"] == {"count": 1, "bytes": 48 * 128 * 2}  # the -done result only
    assert found["reduce-scatter"] == {"count": 1, "bytes": 4 * 8 * 4}  # async-start/-done calling it
    assert found["all-to-all"] == {"count": 0, "bytes": 0}
    assert pods.describe_collectives(found).startswith("all-reduce ×2 (2.3 MiB), all-gather ×1")


def test_shape_bytes_and_roofline():
    assert pods.shape_bytes("(bf16[2,3]{1,0}, f32[], pred[5], s4[4], f8e4m3fn[3])") == 12 + 4 + 5 + 2 + 3
    chip = pods.CHIPS["v5e"]
    seconds, bound = pods.roofline(197e12, 819e9 / 2, chip)  # 1 s of compute, 0.5 s of HBM traffic
    assert seconds == pytest.approx(1.0) and bound == "compute"
    seconds, bound = pods.roofline(1e12, 819e9, chip)
    assert seconds == pytest.approx(1.0) and bound == "memory"


def test_chip_of_topology_names_and_device_kinds():
    assert pods.chip_of("v5e:16x16", "TPU v5 lite") is pods.CHIPS["v5e"]
    assert pods.chip_of("v5litepod:4x4", "TPU v5 lite") is pods.CHIPS["v5e"]
    assert pods.chip_of("v4:2x2x2", "TPU v4").hbm_bytes == 32 * 2**30
    with pytest.raises(ConfigError, match=r"--topology=v9:4x4: no published figures for chip 'TPU v9'"):
        pods.chip_of("v9:4x4", "TPU v9")


def test_topology_without_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setattr(pods, "have_libtpu", lambda: False)
    with pytest.raises(ConfigError, match=r"--topology=v5e:4x4: .*needs libtpu; install the tpu extra "
                                          r"\(pip install -e '\.\[tpu\]'"):
        pods.topology("v5e:4x4")


def test_out_of_memory_compile_is_a_report():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(18.90G) exceeds available HBM (15.75G).\nmore lines")
    error = pods.DoesNotFit(message)
    assert pods.is_out_of_memory(RuntimeError(message)) and not pods.is_out_of_memory(RuntimeError("INTERNAL"))
    assert error.temp_bytes == int(18.90 * 2**30) and error.available_bytes == int(15.75 * 2**30)
    topo = pods.Topology("v5e:4x4", pods.CHIPS["v5e"], devices=(), num_hosts=4)
    report = pods.not_fitting_report(error, topo)
    assert report["fits"] is False and report["compile_error"].endswith("(15.75G).")
    rows = dict(pods.table_rows(report))
    assert rows["memory / chip"].startswith("DOES NOT FIT")
