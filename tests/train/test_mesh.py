"""The tensor-parallel mesh axis: which dimension of each leaf goes where, and what is refused."""

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gptjax.config import ModelConfig, TrainConfig
from gptjax.errors import UserError
from gptjax.options import parse_args
from gptjax.train.parallel import Fsdp, Pmap, parse_mesh
from gptjax.train.setup import model_init


def test_mesh_sizes_and_their_mistakes():
    assert parse_mesh("", 4) == (4, 1)
    assert parse_mesh("model:2", 4) == (2, 2)
    assert parse_mesh("data:2,model:2", 4) == (2, 2)
    assert parse_mesh("data:4", 4) == (4, 1)
    with pytest.raises(UserError, match="needs 8 devices, and this run has 4 devices"):
        parse_mesh("data:4,model:2", 4)
    with pytest.raises(UserError, match="expected axes data:M and model:N"):
        parse_mesh("tensor:2", 4)
    with pytest.raises(UserError, match="model axis \\(4\\) must split each process's 2 devices"):
        parse_mesh("model:4", 4, processes=2)
    with pytest.raises(UserError, match="add --train.parallel=fsdp"):
        TrainConfig(mesh="model:2")


def strategy(model_cfg, mesh, kind=Fsdp):
    from gptjax.config import Config

    cfg = Config(model=model_cfg)
    graphdef, make_params = model_init(cfg)
    return kind(graphdef, optax.adamw(1e-3), 0.0, jax.devices()[:4], mesh=mesh), jax.eval_shape(make_params)


@pytest.mark.parametrize("scan", [False, True])
def test_blocks_split_by_heads_and_width_over_model_and_the_rest_over_data(scan):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, scan_layers=scan, dtype="float32")
    fsdp, params = strategy(cfg, "data:2,model:2")
    specs = jax.tree.map(lambda s: s.spec, fsdp.shardings(params))
    block = specs["h"] if scan else specs["h"][0]
    lead = (None,) if scan else ()  # a stacked block's layer axis
    assert block["attn"]["c_attn"]["kernel"] == P(*lead, "data", "model")   # (D, 3D): columns over model
    assert block["attn"]["c_proj"]["kernel"] == P(*lead, "model", "data")   # (D, D): rows over model
    assert block["mlp"]["c_fc"]["kernel"] == P(*lead, "data", "model")
    assert block["mlp"]["c_proj"]["kernel"] == P(*lead, "model", "data")
    assert block["mlp"]["c_fc"]["bias"][-1] == "model"  # (a stacked one's layer axis may go to data)
    assert specs["wte"]["embedding"] == P("data", None)                      # not a block matrix: data only
    # the optimizer's moments follow their parameters
    state = jax.eval_shape(optax.adamw(1e-3).init, params)
    mu = jax.tree.map(lambda s: s.spec, fsdp.shardings(state))[0].mu
    assert (mu["h"] if scan else mu["h"][0])["attn"]["c_attn"]["kernel"] == P(*lead, "data", "model")


def test_a_model_axis_that_does_not_divide_the_heads_is_named_and_pmap_refuses_one():
    cfg = ModelConfig(n_layer=1, n_head=3, n_embd=18, block_size=16, vocab_size=64, dtype="float32")  # c_attn: 3 x 18 = 54 wide
    fsdp, params = strategy(cfg, "model:4")
    with pytest.raises(UserError, match="h/0/attn/c_attn/(bias|kernel) has 54 there"):
        fsdp.shardings(params)
    with pytest.raises(UserError, match="needs --train.parallel=fsdp"):
        strategy(cfg, "model:2", kind=Pmap)


def test_the_option_reaches_the_config():
    assert parse_args(["--train.parallel=fsdp", "--train.mesh=data:2,model:2"]).train.mesh == "data:2,model:2"
