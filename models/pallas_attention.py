r"""Blockwise (flash-attention style) single-head GAU attention as a Pallas kernel, forward and backward.

Computes, for one head with q, k `[b, n, s]` and v `[b, n, e]` (e ≠ s in general: GAU uses s = 128,
e = 2d), the same output as the XLA path of `models.gau.GatedAttentionUnit` for two normalisers of
`models.attention`:

    softmax        O = softmax_masked(Q Kᵀ / √s) V
    softmax_plus   O = softmax_masked(Q Kᵀ / √s · c) V,   c_i = log(max(l_i, 16)) / log 512

where the mask is causal (key j visible to query i iff j ≤ i) and/or key padding (`key_valid`), and
l_i is the number of keys visible to row i (https://kexue.fm/archives/8823, https://kexue.fm/archives/9019).
Masked weights are exactly zero and a row that sees no valid key outputs zeros (with zero gradient),
as `attention.masked_softmax` does.

Memory is linear in n: the n × n scores are never stored. The algorithm is FlashAttention-2 (Tri Dao,
*FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning*, arXiv 2307.08691):

  forward   grid (b, n/block_q). Each program holds one block of queries and loops over key blocks,
            keeping the running row maximum m, the running sum ℓ = Σ exp(S − m) and the unnormalised
            output in float32; it writes O = acc / ℓ and the row log-sum-exp L = m + log ℓ.
  backward  saved: q, k, v (padded, c already folded into q), the key-validity row, O and L.
            D = rowsum(dO ⊙ O) (plain JAX, linear in n), then P = exp(S − L) is recomputed blockwise:
              dK/dV kernel, grid (b, n/block_k): dV = Pᵀ dO,  dK = dSᵀ Q · scale,
              dQ kernel,    grid (b, n/block_q): dQ = dS K · scale,
            with dP = dO Vᵀ, dS = P ⊙ (dP − D), scale = 1/√s. Both accumulate in float32.
  causal    the key loop of a query block stops after the diagonal block and the query loop of a key
            block starts at the diagonal block: fully masked blocks are skipped.

softmax_plus's factor c_i depends only on the row's visible-key count, which the mask alone determines,
so it is folded into the queries before the kernel (q_i · c_i, computed in plain JAX from `causal` and
`key_valid`; its gradient flows through that product to q, and c itself, a function of the mask only,
is not differentiated). The kernel is then a plain scaled softmax. In bf16 the product q · c is rounded
to bf16, which the XLA path (scaling float32 scores) does not do: a relative difference of order 2⁻⁸.

Layout: q, k and v are padded with zeros to a multiple of the blocks along n (padded keys are marked
invalid, padded query rows are sliced off) and along the feature axes to a power of two ≥ 16 (zero
columns change no dot product; Triton needs power-of-two blocks of at least 16 for its dots).
Causality is by index (query i sees keys 0..i), which is the GAU's positions `arange(n)` outside
decoding. Scores, softmax statistics and accumulators are float32; the output has v's dtype.

Tested against the XLA path on CPU in interpret mode. Its TPU (Mosaic) lowering is compiled ahead of time
for a v5e slice by `make test-pods` (tests/pods/test_pallas.py: inside GAU `base`'s train step, forward and
backward), so Mosaic accepts its blocks, but it has never run on a TPU, and the GPU (Triton) lowering has not
been compiled here at all. The layouts follow the JAX GPU example kernel
(`jax/experimental/pallas/ops/gpu/attention.py`: whole-sequence K/V blocks indexed by a `fori_loop`,
1-D row statistics). Whole-sequence operands live in VMEM, so on a TPU the VMEM need grows with n (memory
stays linear in n, but Mosaic's scoped-VMEM limit is raised to fit: `_tpu_vmem_limit`; GAU `base` compiles at
n = 8192 on a v5e; streaming K/V over a third grid axis, as JAX's TPU flash attention does, would lift that
bound and is not done). A Pallas call has no SPMD partitioning rule, so under a sharded mesh the GAU calls it
through `batch_sharded_attention` (`jax.shard_map` over the batch axes), never on the gathered batch. The
value dimension is not tiled: a program holds a
`[block_q, e]` (forward, dQ) or `[block_k, e]` (dK/dV) float32 accumulator, so with e = 512 smaller
blocks than the default 128 may be needed on a GPU; the block sizes are untuned.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from models import attention, backend as backend_lib

__all__ = ["SUPPORTED_NORMALIZERS", "blockwise_attention", "batch_sharded_attention"]

SUPPORTED_NORMALIZERS = ("softmax", "softmax_plus")
# The masked-score constant of models.attention: finite, so no inf − inf appears in the running maximum.
_MASKED_SCORE = attention._MASKED_SCORE
_MIN_BLOCK = 16  # Triton's dot needs every dimension ≥ 16
_MiB = 2**20


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of the kernels (hashable: a non-differentiable argument of the custom VJP)."""

    sm_scale: float
    causal: bool
    block_q: int
    block_k: int
    interpret: bool
    backend: str
    vmem_limit_bytes: int | None = None  # TPU: Mosaic's scoped VMEM limit (`_tpu_vmem_limit`)

    def call(self, kernel, **kwargs):
        compiler_params = None
        if self.backend == "gpu" and not self.interpret:
            from jax.experimental.pallas import triton as plgpu
            compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
        if self.backend == "tpu" and not self.interpret and self.vmem_limit_bytes:
            from jax.experimental.pallas import tpu as pltpu
            compiler_params = pltpu.CompilerParams(vmem_limit_bytes=self.vmem_limit_bytes)
        return pl.pallas_call(kernel, interpret=self.interpret, compiler_params=compiler_params, **kwargs)


def _tpu_vmem_limit(n: int, s: int, e: int, block_q: int, block_k: int, itemsize: int) -> int:
    """Mosaic's scoped-VMEM limit for these kernels: they hold whole-sequence operands (k and v in the
    forward and dQ kernels, q and dO in dK/dV) in VMEM, double-buffered, so the need grows with n; the
    default limit (16–32 MiB by chip) stops GAU `base` (s = 128, e = 1536, bf16) near n = 4096. Twice
    the estimate, at least 32 MiB and at most 128 MiB (the VMEM of a v5e or v6e core; a chip with less
    refuses to compile, which `train_lib.pods` reports as not fitting)."""
    whole = n * (s + e) * itemsize + 2 * n * 4  # two [n, ·] operands and the [n] statistics
    blocks = (block_q + block_k) * (s + e) * itemsize + block_q * (e + block_k) * 4  # blocks + f32 accumulators
    return int(min(128 * _MiB, max(32 * _MiB, 2 * (2 * whole + blocks))))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _feature_pad(d: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(d))


def _scores(q, k, sm_scale):
    """`q kᵀ · scale` in float32, `[block_q, block_k]`."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * sm_scale


def _mask(cfg: _Config, q_start, k_start, valid):
    """`[block_q, block_k]` visibility of the keys of a block to the queries of a block."""
    mask = jnp.broadcast_to(valid[None, :], (cfg.block_q, cfg.block_k))
    if cfg.causal:
        rows = q_start + jnp.arange(cfg.block_q)
        cols = k_start + jnp.arange(cfg.block_k)
        mask = mask & (cols[None, :] <= rows[:, None])
    return mask


def _causal_key_blocks(cfg: _Config, q_block, num_k_blocks):
    """Key blocks a query block must visit: all, or (causal) up to the one holding its last row."""
    if not cfg.causal:
        return num_k_blocks
    last = lax.div((q_block + 1) * cfg.block_q + cfg.block_k - 1, cfg.block_k)
    return jnp.minimum(last, num_k_blocks)


# ------------------------------------------------------------------------------------------------
# Kernels. Refs: q `[block_q or n, s]`, k `[n, s]`, v `[n, e]`, valid `[n]` int32 (1 = valid key),
# lse / delta `[block_q or n]` float32 (the batch axis is squeezed by the BlockSpecs).
# ------------------------------------------------------------------------------------------------
def _forward_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, cfg: _Config):
    q_block = pl.program_id(1)
    q_start = q_block * cfg.block_q
    num_k_blocks = k_ref.shape[0] // cfg.block_k
    q = q_ref[...]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        k_start = j * cfg.block_k
        keys = pl.ds(k_start, cfg.block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        mask = _mask(cfg, q_start, k_start, valid_ref[keys] > 0)
        s = jnp.where(mask, _scores(q, k, cfg.sm_scale), _MASKED_SCORE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return correction[:, None] * acc + pv, m_next, l_next

    acc = jnp.zeros((cfg.block_q, v_ref.shape[1]), jnp.float32)
    m = jnp.full((cfg.block_q,), _MASKED_SCORE, jnp.float32)
    l = jnp.zeros((cfg.block_q,), jnp.float32)
    acc, m, l = lax.fori_loop(0, _causal_key_blocks(cfg, q_block, num_k_blocks), body, (acc, m, l))
    nonempty = l > 0.0  # a row without a valid key has ℓ = 0 and acc = 0: output 0, not 0/0
    o_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config):
    k_block = pl.program_id(1)
    k_start = k_block * cfg.block_k
    num_q_blocks = q_ref.shape[0] // cfg.block_q
    k, v, valid = k_ref[...], v_ref[...], valid_ref[...] > 0

    def body(i, carry):
        dk, dv = carry
        q_start = i * cfg.block_q
        queries = pl.ds(q_start, cfg.block_q)
        q, do = q_ref[queries, :], do_ref[queries, :]
        lse, delta = lse_ref[queries], delta_ref[queries]
        mask = _mask(cfg, q_start, k_start, valid)
        p = jnp.where(mask, jnp.exp(_scores(q, k, cfg.sm_scale) - lse[:, None]), 0.0)
        dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        return dk, dv

    # Causal: query blocks that end before this key block starts see none of its keys.
    first = lax.div(k_start, cfg.block_q) if cfg.causal else 0
    dk = jnp.zeros(k_ref.shape, jnp.float32)
    dv = jnp.zeros(v_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, num_q_blocks, body, (dk, dv))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    q_block = pl.program_id(1)
    q_start = q_block * cfg.block_q
    num_k_blocks = k_ref.shape[0] // cfg.block_k
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        k_start = j * cfg.block_k
        keys = pl.ds(k_start, cfg.block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        mask = _mask(cfg, q_start, k_start, valid_ref[keys] > 0)
        p = jnp.where(mask, jnp.exp(_scores(q, k, cfg.sm_scale) - lse[:, None]), 0.0)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    dq = jnp.zeros(q_ref.shape, jnp.float32)
    dq = lax.fori_loop(0, _causal_key_blocks(cfg, q_block, num_k_blocks), body, dq)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP (on padded arrays: n a multiple of both blocks).
# ------------------------------------------------------------------------------------------------
def _row_spec(block, feature):
    return pl.BlockSpec((None, block, feature), lambda b, i: (b, i, 0))


def _full_spec(n, feature):
    return pl.BlockSpec((None, n, feature), lambda b, i: (b, 0, 0))


def _forward(cfg: _Config, q, k, v, valid):
    b, n, s = q.shape
    e = v.shape[-1]
    return cfg.call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(b, n // cfg.block_q),
        in_specs=[_row_spec(cfg.block_q, s), _full_spec(n, s), _full_spec(n, e),
                  pl.BlockSpec((None, n), lambda b, i: (b, 0))],
        out_specs=[_row_spec(cfg.block_q, e), pl.BlockSpec((None, cfg.block_q), lambda b, i: (b, i))],
        out_shape=[jax.ShapeDtypeStruct((b, n, e), v.dtype), jax.ShapeDtypeStruct((b, n), jnp.float32)],
        name="gau_blockwise_attention_forward",
    )(q, k, v, valid)


def _backward(cfg: _Config, q, k, v, valid, o, lse, do):
    b, n, s = q.shape
    e = v.shape[-1]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # D = rowsum(dO ⊙ O), [b, n]
    valid_full = pl.BlockSpec((None, n), lambda b, i: (b, 0))
    stats_full = pl.BlockSpec((None, n), lambda b, i: (b, 0))
    dk, dv = cfg.call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(b, n // cfg.block_k),
        in_specs=[_full_spec(n, s), _row_spec(cfg.block_k, s), _row_spec(cfg.block_k, e),
                  pl.BlockSpec((None, cfg.block_k), lambda b, j: (b, j)),
                  _full_spec(n, e), stats_full, stats_full],
        out_specs=[_row_spec(cfg.block_k, s), _row_spec(cfg.block_k, e)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="gau_blockwise_attention_dkdv",
    )(q, k, v, valid, do, lse, delta)
    stats_rows = pl.BlockSpec((None, cfg.block_q), lambda b, i: (b, i))
    dq = cfg.call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, n // cfg.block_q),
        in_specs=[_row_spec(cfg.block_q, s), _full_spec(n, s), _full_spec(n, e), valid_full,
                  _row_spec(cfg.block_q, e), stats_rows, stats_rows],
        out_specs=_row_spec(cfg.block_q, s),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="gau_blockwise_attention_dq",
    )(q, k, v, valid, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, valid):
    return _forward(cfg, q, k, v, valid)[0]


def _attention_fwd(cfg: _Config, q, k, v, valid):
    o, lse = _forward(cfg, q, k, v, valid)
    return o, (q, k, v, valid, o, lse)


def _attention_bwd(cfg: _Config, residuals, do):
    q, k, v, valid, o, lse = residuals
    dq, dk, dv = _backward(cfg, q, k, v, valid, o, lse, do)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry point.
# ------------------------------------------------------------------------------------------------
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, normalizer: str, causal: bool,
                        key_valid: jax.Array | None = None, block_q: int = 128, block_k: int = 128,
                        interpret: bool | None = None) -> jax.Array:
    """Single-head attention `normaliser(Q Kᵀ) V` by blocks (Pallas), memory linear in n; see the module doc.

    Args:
      q, k: `[b, n, s]` queries and keys (same dtype; RoPE already applied).
      v: `[b, n, e]` values; e may differ from s.
      normalizer: 'softmax' (`softmax(QKᵀ/√s)`) or 'softmax_plus' (`softmax(QKᵀ/√s · log(max(l,16))/log 512)`).
      causal: query i sees keys j ≤ i only (by index).
      key_valid: optional `[b, n]` booleans, False for padding keys.
      block_q, block_k: rows of a query / key block (clipped to n rounded up to a power of two ≥ 16);
        n is padded to a multiple of both.
      interpret: run the kernels in Pallas interpret mode; None = interpret on CPU, compiled on GPU/TPU (the
        platform of `models.backend.current()`: the target of an ahead-of-time compile, else JAX's backend).
    Returns:
      `[b, n, e]` in v's dtype (float32 scores, statistics and accumulation). Rows with no visible valid
      key give zeros, as the XLA normalisers do. Differentiable in q, k and v (custom VJP, Pallas kernels).

    Tested on CPU in interpret mode; compiled (not run) for TPU by `make test-pods`; never compiled for GPU here.
    """
    if normalizer not in SUPPORTED_NORMALIZERS:
        raise ValueError(f"blockwise_attention supports the normalisers {list(SUPPORTED_NORMALIZERS)}, "
                         f"got {normalizer!r}")
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [b, n, s] and v [b, n, e], got {q.shape}, {k.shape}, {v.shape}")
    if key_valid is not None and key_valid.shape != q.shape[:2]:
        raise ValueError(f"key_valid must be [b, n] = {q.shape[:2]}, got {key_valid.shape}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    b, n, s = q.shape
    e = v.shape[-1]
    backend = backend_lib.current()
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    dtype = jnp.promote_types(q.dtype, k.dtype)
    q, k = q.astype(dtype), k.astype(dtype)

    if normalizer == "softmax_plus":
        # The factor is a function of the mask only: fold it into q; d/dq flows through the product.
        factor = lax.stop_gradient(attention.softmax_plus_scale(
            attention.visible_key_counts(n, causal=causal, key_valid=key_valid, batch=b)))
        q = (q.astype(jnp.float32) * factor[..., None]).astype(dtype)

    longest = max(_MIN_BLOCK, pl.next_power_of_2(n))
    block_q, block_k = min(block_q, longest), min(block_k, longest)
    n_pad = _round_up(n, math.lcm(block_q, block_k))
    s_pad, e_pad = _feature_pad(s), _feature_pad(e)
    valid = jnp.ones((b, n), jnp.int32) if key_valid is None else key_valid.astype(jnp.int32)
    valid = jnp.pad(valid, ((0, 0), (0, n_pad - n)))  # padded keys are invalid
    qp = jnp.pad(q, ((0, 0), (0, n_pad - n), (0, s_pad - s)))
    kp = jnp.pad(k, ((0, 0), (0, n_pad - n), (0, s_pad - s)))
    vp = jnp.pad(v, ((0, 0), (0, n_pad - n), (0, e_pad - e)))
    cfg = _Config(sm_scale=1.0 / math.sqrt(s), causal=bool(causal), block_q=block_q, block_k=block_k,
                  interpret=bool(interpret), backend=backend,
                  vmem_limit_bytes=_tpu_vmem_limit(n_pad, s_pad, e_pad, block_q, block_k, q.dtype.itemsize))
    return _attention(cfg, qp, kp, vp, valid)[:, :n, :e]


def batch_sharded_attention(q, k, v, *, batch_axes, key_valid=None, **kwargs):
    """`blockwise_attention` on each device's rows of the batch, under the mesh of `jax.set_mesh`.

    A Pallas call has no SPMD partitioning rule: inside a sharded `jit`, XLA would gather q, k and v of the
    whole batch onto every device before the kernel. Attention is independent per example, so the kernel
    runs under `jax.shard_map` on the local rows instead (q, k, v split over `batch_axes`, e.g.
    ('data', 'fsdp'); their other axes are gathered if sharded, since the kernel needs whole rows of q and k).
    Without a mesh, or with `batch_axes` None, this is `blockwise_attention`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or batch_axes is None:
        return blockwise_attention(q, k, v, key_valid=key_valid, **kwargs)
    spec = jax.sharding.PartitionSpec(batch_axes)
    call = functools.partial(blockwise_attention, **kwargs)
    if key_valid is None:
        sharded = jax.shard_map(lambda q, k, v: call(q, k, v), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                                check_vma=False)
        return sharded(q, k, v)
    sharded = jax.shard_map(lambda q, k, v, valid: call(q, k, v, key_valid=valid), mesh=mesh,
                            in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
    return sharded(q, k, v, key_valid)
