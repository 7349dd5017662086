"""The model's matrix products in bfloat16, written in the form a CPU's matrix units take.

XLA's CPU backend hands a bfloat16 product to its fast kernels (YNNPACK's, which use AMX or AVX-512
BF16 where the CPU has them) only when the product accumulates in float32 and both operands lie in
memory in the plain form: the left operand's last axis against the right operand's first, each
array row-major. A transpose written in the program is not carried out: XLA folds it into the
product's dimension numbers, and the product takes the generic path instead (measured on a 2-core
Xeon with AMX, jaxlib 0.10: x.T @ h of (2048, 384)ᵀ by (2048, 1536) at 164-208 GFLOP/s, and at
1,232 with x.T laid out transposed in memory). Autodiff writes every weight's gradient as such a
transposed product, and the output layer, stored (V, D), multiplies transposed in the forward pass.

So, for bfloat16 compute on a CPU with bfloat16 matrix units (amx_bf16 or avx512_bf16):
  - `dot_general` (the linear layers' product) and `head_product` (the output layer's) accumulate
    in float32 and cast after, and carry a backward pass of their own (jax.custom_vjp) whose
    products are plain too;
  - `plain(a)` pins an array to the row-major layout (jax's layout constraint), so that a
    transpose of it is made as a copy in memory: one pass through the array, where the product
    that reads it makes hundreds.
Everywhere else (float32 compute; GPUs and TPUs, whose libraries take transposed operands as
they are; CPUs without the units, where XLA computes bfloat16 products in float32) the products
are written as before, and float32's numerics are unchanged bit for bit.

Dimension letters: M rows (tokens), K the contracted axis, N the product's columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.nnx.nn.dtypes import promote_dtype
from jax.experimental.layout import Layout, with_layout_constraint

from gptjax.runtime import precision


def plain_forms(dtype) -> bool:
    """Whether products in `dtype` are written in the plain forms here: bfloat16 on a CPU with bfloat16
    matrix units (the backend and the CPU's flags as gptjax.runtime.precision reads them, which
    GPTJAX_HARDWARE can inject). A CPU without the units computes a bfloat16 product as a float32 one,
    and there the forms XLA picks itself are the faster (measured on a 2-core Zen 3 class EPYC, the
    reference shape in bfloat16: 298 tokens/s in XLA's forms, 203 in the plain forms)."""
    return jnp.dtype(dtype) == jnp.bfloat16 and precision.backend() == "cpu" and bool(precision.bf16_units())


def plain(a: jax.Array) -> jax.Array:
    """`a` laid out row-major in memory: a transposed view becomes a transposed copy."""
    return with_layout_constraint(a, Layout(tuple(range(a.ndim))))


def plain_dot(a_MK, b_KN):
    """The plain product of two 2-d operands, accumulated in float32."""
    return jax.lax.dot_general(a_MK, b_KN, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul(x, w_KN):
    """x @ w over x's last axis, in x's dtype (bfloat16), accumulated in float32; w (K, N), any float dtype
    (the float32 parameter: cast here, and its gradient comes back in float32 from the product)."""
    K, N = w_KN.shape
    y_MN = plain_dot(x.reshape(-1, K), w_KN.astype(x.dtype))
    return y_MN.astype(x.dtype).reshape(*x.shape[:-1], N)


def _matmul_fwd(x, w_KN):
    return matmul(x, w_KN), (x, w_KN)


def _matmul_bwd(residuals, g):
    x, w_KN = residuals
    K, N = w_KN.shape
    x_MK, g_MN = x.reshape(-1, K), g.reshape(-1, N).astype(x.dtype)
    dx_MK = plain_dot(g_MN, plain(w_KN.astype(x.dtype).T))  # the input's gradient: g @ wᵀ, wᵀ made in memory
    dw_KN = plain_dot(plain(x_MK.T), g_MN)  # the weight's: xᵀ @ g, contracting over the tokens
    return dx_MK.astype(x.dtype).reshape(x.shape), dw_KN.astype(w_KN.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """jax.lax.dot_general for flax's nnx.Linear (its `dot_general=`, with keep_kernel as its promote_dtype):
    the layer's x @ kernel in the plain forms (matmul) where plain_forms says so, and elsewhere
    lax.dot_general itself, the kernel cast to the input's dtype as flax casts it."""
    (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
    linear = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
              and not lhs_batch)
    if linear and plain_forms(lhs.dtype) and preferred_element_type is None and out_sharding is None:
        return matmul(lhs, rhs)
    rhs = rhs.astype(lhs.dtype)  # no operation: flax's promote_dtype cast it already
    kwargs = {"out_sharding": out_sharding} if out_sharding is not None else {}
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def keep_kernel(arrays, /, *, dtype=None, inexact=True):
    """nnx.Linear's promote_dtype: flax's own, but for the plain forms, where the input and the bias are cast
    to the compute dtype as flax casts them and the kernel is left in its own (float32), so that matmul's
    weight gradient comes back from its float32 sum."""
    if dtype is None or not plain_forms(dtype):
        return promote_dtype(arrays, dtype=dtype, inexact=inexact)
    x, kernel, bias = arrays
    x, bias = (None if a is None else jnp.asarray(a, dtype) for a in (x, bias))
    return x, kernel, bias


@jax.custom_vjp
def head_product(x, w_NK):
    """x @ w.T in float32 (logits) for x in the compute dtype (bfloat16) and the output layer w stored
    (V, D) = (N, K), float32: w.T is made once in memory, (D, V) in bfloat16, for the plain product."""
    N, K = w_NK.shape
    return plain_dot(x.reshape(-1, K), plain(w_NK.astype(x.dtype).T)).reshape(*x.shape[:-1], N)


def _head_fwd(x, w_NK):
    return head_product(x, w_NK), (x, w_NK)


def _head_bwd(residuals, g):
    x, w_NK = residuals
    N, K = w_NK.shape
    x_MK, g_MN = x.reshape(-1, K), g.reshape(-1, N).astype(x.dtype)
    dx_MK = plain_dot(g_MN, w_NK.astype(x.dtype))  # stored (N, K): already the plain form
    return dx_MK.astype(x.dtype).reshape(x.shape), transposed(plain_dot(plain(x_MK.T), g_MN)).astype(w_NK.dtype)


head_product.defvjp(_head_fwd, _head_bwd)


def transposed(a_KN):
    """a.T of a product's float32 result, as a copy: the product is made (K, N), plain, and its result
    then turned, where XLA would otherwise fold the transpose back into the product."""
    return plain(plain(a_KN).T)


# ----------------------------------------------------------------------------- auto's measurement

MEASURE_FLOP = 1e10  # the most each timed call computes: the block's rows, the output layer's columns cut to it


def _dims(cfg) -> tuple[tuple[int, int], ...]:
    """(K, N) of one block's linear layers: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj."""
    D, H = cfg.n_embd, cfg.n_embd // cfg.n_head
    F = cfg.ffn_width
    return ((D, (cfg.n_head + 2 * cfg.kv_heads) * H), (D, D), (D, 2 * F if cfg.mlp == "swiglu" else F), (F, D))


def shape_key(cfg) -> tuple:
    """What auto's measurement depends on: the model's product shapes (one key per model shape)."""
    return (cfg.n_layer, _dims(cfg), cfg.padded_vocab_size, cfg.n_embd)


LINEAR = (((1,), (0,)), ((), ()))


def _products(dtype, dims, V: int, D: int):
    """Two jitted functions computing, in `dtype`, one block's linear products and the output layer's, each
    forward and backward, as the training step writes them (the same functions: dot_general, head_product)."""
    def block(xs, ws, gs):
        out = []
        for x, w, g in zip(xs, ws, gs):
            y, pullback = jax.vjp(lambda x, w: dot_general(x, w, LINEAR), x, w)
            out += [y, *pullback(g)]
        return out

    def head(x, w, g):
        if plain_forms(dtype):
            y, pullback = jax.vjp(head_product, x, w)
        else:
            y, pullback = jax.vjp(lambda x, w: jnp.dot(x, w.astype(dtype).T).astype(jnp.float32), x, w)
        return [y, *pullback(g)]

    return jax.jit(block), jax.jit(head)


def _best_time(fn, args, repeats: int = 3) -> float:
    import time

    jax.block_until_ready(fn(*args))  # compiled
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def step_speedup(cfg, tokens: int = 0) -> float:
    """How much faster this model's training step's products run in bfloat16 than in float32 here: the
    linear layers' and the output layer's products, forward and backward, in the forms each dtype's step
    writes them, at `tokens` rows (the step's tokens per device, at most 2,048). A block's time counts
    n_layer times; the output layer is timed on as many of its columns as MEASURE_FLOP allows and scaled
    to all of them (a wide vocabulary is many columns of one product form), and a block wider than
    MEASURE_FLOP on fewer rows. float32's time over bfloat16's."""
    import numpy as np

    dims, V, D = _dims(cfg), cfg.padded_vocab_size, cfg.n_embd
    M = int(min(tokens or 2048, 2048))
    M_block = int(min(M, max(64, MEASURE_FLOP // (6 * sum(k * n for k, n in dims)))))
    V_head = int(min(V, max(256, MEASURE_FLOP // (6 * M * D)) // 128 * 128))
    rng = np.random.default_rng(0)
    total = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        def arr(*shape, dt=dtype):
            return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, dt)

        block, head = _products(dtype, dims, V, D)
        xs, ws = [arr(M_block, k) for k, _ in dims], [arr(k, n, dt=jnp.float32) for k, n in dims]
        t_block = _best_time(block, (xs, ws, [arr(M_block, n) for _, n in dims])) * M / M_block
        t_head = _best_time(head, (arr(M, D), arr(V_head, D, dt=jnp.float32), arr(M, V_head, dt=jnp.float32)))
        total[dtype] = cfg.n_layer * t_block + t_head * V / V_head
    return total[jnp.float32] / total[jnp.bfloat16]


def auto_inputs(cfg, tokens: int = 0) -> tuple:
    """(shape, measure) for precision.decide and its kin: this model's key and the timing of its step."""
    return shape_key(cfg), lambda: step_speedup(cfg, tokens)


def decision(cfg, tokens: int = 0) -> precision.Decision:
    """precision.decide for this model: what auto stands for here, measured on its own step's products."""
    return precision.decide(*auto_inputs(cfg, tokens))


def explain_dtype(cfg, tokens: int = 0) -> precision.Decision:
    """precision.explain for this model's dtype: (float32, 'as set'), or (bfloat16, 'auto: ...') and so on."""
    return precision.explain(cfg.dtype, *auto_inputs(cfg, tokens))
