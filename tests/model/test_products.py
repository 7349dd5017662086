"""bfloat16 products in the plain forms a CPU's matrix units take (gptjax.model.products), float32 untouched.

The lowered module is the program as gptjax writes it, the same on every CPU: there every product of
bfloat16 operands outside attention must accumulate in float32, in the plain form, and read no
transpose that XLA could fold back into it. The optimized module is what XLA made of it on this
machine: where its products stay in bfloat16 (XLA hands them to its YNNPACK kernels), each must still
be plain, its operands row-major in memory; where XLA turned them into float32 products there is
nothing to check, and the test says so.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model import gpt, products
from gptjax.model.gpt import GPT
from gptjax.runtime import precision

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 16, "vocab_size": 200}
UNITS = "backend=cpu,flags=amx_bf16,speedup=2.0"  # a CPU with the units: the plain forms, on any CPU
NO_UNITS = "backend=cpu,flags="  # a CPU without: XLA's own forms


@pytest.fixture(autouse=True)
def cpu_with_units(monkeypatch):
    monkeypatch.setenv(precision.HARDWARE_ENV, UNITS)


def split(dtype, **kw):
    return nnx.split(GPT(ModelConfig(**{**SHAPE, "dtype": dtype, **kw}), nnx.Rngs(0)))


def batch(B=2, T=16, V=200):
    x = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    return x, jnp.roll(x, -1, axis=1)


def step(graphdef, **kw):
    """The training step's loss and gradients, jitted (the trainer's step adds the optimizer only)."""
    x, y = batch()
    return jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(x, y, **kw)))


def decode_step(graphdef, params):
    """One token through the cache, with the (D, V) output matrix: what the sampler's loop does per token."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(1)

    def one(params, cache, head_DV, idx):
        return nnx.merge(graphdef, params).decode(idx, cache, head_DV=head_DV)

    return jax.jit(one), (params, cache, model.output_matrix(), jnp.zeros((1, 1), jnp.int32))


# ----------------------------------------------------------------------------- the lowered module

DOT = re.compile(r"(%\S+) = stablehlo\.dot_general (%[\w#]+), (%[\w#]+),(?: batching_dims = \[[\d, ]*\] x \[[\d, ]*\],)? "
                 r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\].*: \(tensor<([\dx]+)x(\w+)>, tensor<([\dx]+)x(\w+)>\) "
                 r"-> tensor<[\dx]+x(\w+)>")
DEFINED = re.compile(r"(%[\w#]+) = (?:stablehlo\.(\w+)|(?:stablehlo\.)?custom_call @(\w+))")


def lowered_products(text: str):
    """(kind, plain, accumulates in float32, reads a transpose) of every dot_general of bfloat16 operands;
    kind "batched" for the ones with batch dimensions (attention's), "matrix" for the others."""
    found = []
    for function in text.split("func.func")[1:]:  # value names are a function's own
        defined = {m.group(1): m.group(2) or m.group(3) for m in DEFINED.finditer(function)}
        for line in function.splitlines():
            m = DOT.search(line)
            if not m or "bf16" not in (m.group(7), m.group(9)):
                continue
            lhs_rank, rhs_rank = len(m.group(6).split("x")), len(m.group(8).split("x"))
            # the left operand's last axis against a matrix's first (rows of any shape: (B, T, D) is (B·T, D))
            plain = m.group(4) == str(lhs_rank - 1) and m.group(5) == "0" and rhs_rank == 2
            transposed = any(defined.get(name.split("#")[0]) == "transpose" for name in (m.group(2), m.group(3)))
            found.append(("batched" if "batching_dims" in line else "matrix", plain, m.group(10) == "f32", transposed))
    return found


def check_lowered(text: str) -> int:
    products_ = lowered_products(text)
    matrices = [p for p in products_ if p[0] == "matrix"]
    assert matrices, "no bfloat16 product found"
    assert all(p[1] for p in matrices), f"{sum(not p[1] for p in matrices)} products not in the plain form"
    assert all(p[2] for p in matrices), f"{sum(not p[2] for p in matrices)} products not accumulated in float32"
    assert not any(p[3] for p in matrices), "a product reads a transpose XLA may fold into it"
    return len(matrices)


@pytest.mark.parametrize("chunk", [0, 16])
def test_the_bfloat16_step_writes_every_matrix_product_plain_with_float32_sums(chunk):
    graphdef, params = split("bfloat16")
    text = step(graphdef, chunk=chunk).lower(params).as_text()
    # per block 4 layers x 3 products (forward, the input's and the weight's gradient), 3 for the output layer.
    # Attention's products (batched over sequences and heads) are jax.nn.dot_product_attention's own,
    # forward and backward; XLA lays them out itself (the optimized module below checks what it made).
    assert check_lowered(text) == 2 * 4 * 3 + 3


def test_the_bfloat16_decoding_step_writes_every_matrix_product_plain():
    graphdef, params = split("bfloat16")
    fn, args = decode_step(graphdef, params)
    # 4 layers per block and the output layer; the cache's attention products are batched (named above)
    assert check_lowered(fn.lower(*args).as_text()) == 2 * 4 + 1


@pytest.mark.parametrize("hardware, dtype", [(UNITS, "float32"), (NO_UNITS, "float32"), (NO_UNITS, "bfloat16"),
                                             ("backend=gpu", "bfloat16")])
def test_elsewhere_the_program_is_written_exactly_as_before(hardware, dtype, monkeypatch):
    """The plain forms are for bfloat16 on a CPU with the units alone: float32's program is the one flax's own
    layers make (its numerics unchanged bit for bit), and so is bfloat16's elsewhere."""
    monkeypatch.setenv(precision.HARDWARE_ENV, hardware)

    def program():
        graphdef, params = split(dtype)
        grad = jax.grad(lambda p: nnx.merge(graphdef, p).loss(*batch(), chunk=16))
        return str(jax.make_jaxpr(grad)(params))

    ours = program()
    monkeypatch.setattr(products, "dot_general", jax.lax.dot_general)
    monkeypatch.setattr(products, "keep_kernel", nnx.nn.dtypes.promote_dtype)
    assert ours == program()
    assert "layout_constraint" not in ours


# ----------------------------------------------------------------------------- the optimized module

HLO_DEF = re.compile(r"(%[\w.-]+) = (\w+)\[([\d,]*)\]\{([\d,]*)")
HLO_DOT = re.compile(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\((%[\w.-]+), (%[\w.-]+)\)(.*)")


def optimized_products(text: str, bfloat16_only: bool = True):
    """(plain, operands row-major) of every product XLA kept in bfloat16 in the optimized module (or of every
    product, whatever its dtype)."""
    types = {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in HLO_DEF.finditer(text)}
    found = []
    for m in HLO_DOT.finditer(text):
        lhs, rhs = types[m.group(1)], types[m.group(2)]
        if bfloat16_only and "bf16" not in (lhs[0], rhs[0]):
            continue

        def dims(name):
            hit = re.search(rf"{name}=\{{([\d,]*)\}}", m.group(3))
            return [int(d) for d in hit.group(1).split(",") if d] if hit else []

        b = len(dims("lhs_batch_dims"))
        lhs_rank = len(lhs[1].split(","))
        plain = (dims("lhs_batch_dims") == dims("rhs_batch_dims") == list(range(b))
                 and dims("lhs_contracting_dims") == [lhs_rank - 1] and dims("rhs_contracting_dims") == [b])
        row_major = all(t[2] == ",".join(str(d) for d in reversed(range(len(t[1].split(","))))) for t in (lhs, rhs))
        found.append((plain, row_major))
    return found


@pytest.mark.parametrize("which", ["train", "decode"])
def test_what_xla_makes_of_them_stays_plain(which):
    graphdef, params = split("bfloat16")
    if which == "train":
        compiled = step(graphdef, chunk=16).lower(params).compile()
    else:
        fn, args = decode_step(graphdef, params)
        compiled = fn.lower(*args).compile()
    found = optimized_products(compiled.as_text())
    if not found:
        pytest.skip("XLA turned every bfloat16 product into a float32 one on this CPU: no bfloat16 form to check")
    assert all(plain for plain, _ in found), f"{sum(not p for p, _ in found)} of {len(found)} products not plain"
    assert all(rows for _, rows in found), "an operand of a bfloat16 product is not row-major in memory"


def test_the_old_forms_leave_transposed_products_which_the_check_sees(monkeypatch):
    """The check is not vacuous: with the plain forms off (a CPU without the units, injected) the optimized module keeps
    products in transposed forms (on a CPU without bfloat16 units XLA also turns those into float32 products:
    bfloat16 results it cannot compute), where the plain forms leave none."""
    graphdef, params = split("bfloat16")
    ours = optimized_products(step(graphdef, chunk=16).lower(params).compile().as_text(), bfloat16_only=False)
    monkeypatch.setenv(precision.HARDWARE_ENV, NO_UNITS)
    graphdef, params = split("bfloat16")
    old = optimized_products(step(graphdef, chunk=16).lower(params).compile().as_text(), bfloat16_only=False)
    assert all(plain for plain, _ in ours) and not all(plain for plain, _ in old)


# ----------------------------------------------------------------------------- numerics

def max_rel_diff(a_tree, b_tree) -> float:
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                     / (jnp.max(jnp.abs(a.astype(jnp.float32))) + 1e-30))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


@pytest.mark.parametrize("kw", [{"chunk": 16}, {"chunk": 0}, {"chunk": 16, "remat": "dots"}, {"chunk": 16, "remat": "block"}])
def test_the_plain_forms_compute_what_the_old_forms_compute(kw, monkeypatch):
    """The same bfloat16 loss and gradients as XLA's own forms (injected: a CPU without the units), to bfloat16
    rounding; float32 sums round less, so the two are not identical."""
    graphdef, params = split("bfloat16")
    loss, grads = step(graphdef, **kw)(params)
    monkeypatch.setenv(precision.HARDWARE_ENV, NO_UNITS)
    graphdef, params = split("bfloat16")
    old_loss, old_grads = step(graphdef, **kw)(params)
    np.testing.assert_allclose(loss, old_loss, rtol=1e-2)
    assert max_rel_diff(old_grads, grads) < 5e-2
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # float32 parameters, float32 gradients


def test_scanned_layers_take_the_plain_forms():
    graphdef, params = split("bfloat16", scan_layers=True)
    text = step(graphdef, chunk=16).lower(params).as_text()
    assert check_lowered(text) == 4 * 3 + 3  # one block's products, in the scanned body


# ----------------------------------------------------------------------------- auto's measurement

def test_auto_times_this_models_own_products_once_per_shape(monkeypatch):
    monkeypatch.setenv(precision.HARDWARE_ENV, "backend=cpu,flags=amx_bf16")  # units, no speed-up given
    monkeypatch.setattr(precision, "_decisions", {})
    calls = []

    def measured(cfg, tokens=0):
        calls.append((cfg.n_embd, tokens))
        return 2.0 if cfg.n_embd == 64 else 1.1

    monkeypatch.setattr(products, "step_speedup", measured)
    cfg = ModelConfig(**{**SHAPE, "dtype": "auto"})
    assert products.decision(cfg, tokens=512).dtype == "bfloat16"
    assert "measured 2.00x" in products.decision(cfg).why
    assert gpt.compute_dtype(cfg) == jnp.bfloat16
    wider = ModelConfig(**{**SHAPE, "n_embd": 128, "dtype": "auto"})
    assert gpt.compute_dtype(wider) == jnp.float32 and "only 1.10x" in products.decision(wider).why
    assert calls == [(64, 512), (128, 0)]  # once per shape, the first caller's tokens


def test_the_measurement_runs_the_steps_products():
    ratio = products.step_speedup(ModelConfig(**{**SHAPE, "dtype": "auto"}), tokens=64)
    assert np.isfinite(ratio) and ratio > 0
