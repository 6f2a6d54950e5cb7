"""μP / depth-μP / γ: exact tables, validation, both backends, torch/JAX agreement, coordinate check."""
from __future__ import annotations

import copy
import math
import pickle
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
fnn = pytest.importorskip("flax.linen")

from torch import nn  # noqa: E402

from curvopt import mup as core  # noqa: E402
from jax_backend import mup as jmup  # noqa: E402
from torch_backend import mup as tmup  # noqa: E402

IN, OUT, VOCAB, T, HEADS = 8, 10, 50, 8, 2


# ----------------------------------------------------------------------------------------------- models
def torch_mlp(w: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, OUT))


class FlaxMLP(fnn.Module):
    w: int

    @fnn.compact
    def __call__(self, x):
        x = fnn.relu(fnn.Dense(self.w, name="l0")(x))
        x = fnn.relu(fnn.Dense(self.w, name="l2")(x))
        return fnn.Dense(OUT, name="l4")(x)


class TorchAttn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv, self.proj, self.scale = nn.Linear(d, 3 * d), nn.Linear(d, d), 1.0 / math.sqrt(d // HEADS)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TorchBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), TorchAttn(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    def __init__(self, d: int, tied: bool = False):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Parameter(torch.zeros(T, d))
        self.blocks = nn.ModuleList([TorchBlock(d), TorchBlock(d)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class FlaxBlock(fnn.Module):
    d: int

    @fnn.compact
    def __call__(self, x):
        h = fnn.LayerNorm(name="ln1")(x)
        qkv = fnn.Dense(3 * self.d, name="qkv")(h)  # only shapes matter for the tables
        x = x + fnn.Dense(self.d, name="proj")(qkv[..., : self.d])
        h = fnn.Dense(4 * self.d, name="mlp0")(fnn.LayerNorm(name="ln2")(x))
        return x + fnn.Dense(self.d, name="mlp2")(fnn.gelu(h))


class FlaxGPT(fnn.Module):
    d: int

    @fnn.compact
    def __call__(self, idx):
        x = fnn.Embed(VOCAB, self.d, name="emb")(idx) + self.param("pos", fnn.initializers.zeros, (T, self.d))
        for i in range(2):
            x = FlaxBlock(self.d, name=f"blocks_{i}")(x)
        return fnn.Dense(VOCAB, name="head")(fnn.LayerNorm(name="ln_f")(x))


def flax_params(module, x):
    return module.init(jax.random.PRNGKey(0), x)


def flax_shapes(module, x):
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


def torch_to_flax_name(name: str) -> str:
    """``blocks.0.attn.qkv.weight`` -> ``params/blocks_0/qkv/kernel`` (the test models' naming)."""
    n = re.sub(r"^(\d)\.", r"l\1.", name)
    n = re.sub(r"blocks\.(\d)\.", r"blocks_\1.", n).replace("attn.", "").replace("mlp.", "mlp")
    mod, _, leaf = n.rpartition(".")
    if leaf == "weight":
        leaf = "embedding" if mod == "emb" else "scale" if mod.rsplit(".", 1)[-1].startswith("ln") else "kernel"
    return "/".join(["params", *(mod.split(".") if mod else []), leaf])


GPT_OVERRIDES_T = {"pos": "embedding"}
GPT_OVERRIDES_J = {"params/pos": "embedding", "params/emb/embedding": "embedding"}
GPT_BRANCHES_T = ["blocks.*.attn", "blocks.*.mlp"]
GPT_BRANCHES_J = ["params/blocks_*/qkv/*", "params/blocks_*/proj/*", "params/blocks_*/mlp*/*"]


def mult(table, name):
    s = table[name]
    return s.role, s.init_std, s.forward_mult, s.lr_mult, s.wd_mult


# ----------------------------------------------------------------------------------------------- core
def test_infer_role_and_fans():
    assert core.infer_role((64, 8), (32, 8), "out_in") == "input"
    assert core.infer_role((64, 64), (32, 32), "out_in") == "hidden"
    assert core.infer_role((10, 64), (10, 32), "out_in") == "output"
    assert core.infer_role((10, 64), (10, 32), "in_out") == "input"
    assert core.infer_role((64,), (32,), "vector") == "input"
    assert core.infer_role((10,), (10,), "vector") == "finite"
    assert core.infer_role((16, 3, 5, 5), (8, 3, 5, 5), "out_in") == "input"
    assert core.fans((16, 8, 3, 3), "out_in") == (72, 16)
    assert core.fans((3, 3, 8, 16), "in_out") == (72, 16)
    assert core.width_mults((32, 16, 3, 3), (16, 8, 3, 3), "out_in") == (2.0, 2.0)


def test_role_scaling_table_cells():
    m = 4.0
    cell = lambda role, opt, par: core.role_scaling(role, m, m, optimizer=opt, parameterization=par)  # noqa: E731
    assert cell("input", "adam", "mup") == core.RoleScaling(1.0, 1.0, 1.0, 1.0)
    assert cell("hidden", "adam", "mup") == core.RoleScaling(1.0, 1.0, 0.25, 4.0)
    assert cell("output", "adam", "mup") == core.RoleScaling(2.0, 0.25, 1.0, 1.0)  # stored std σ/√base_fan_in
    assert cell("input", "sgd", "mup") == core.RoleScaling(1.0, 1.0, 4.0, 0.25)
    assert cell("hidden", "sgd", "mup") == core.RoleScaling(1.0, 1.0, 1.0, 1.0)
    assert cell("output", "sgd", "mup") == core.RoleScaling(2.0, 0.25, 4.0, 0.25)
    for role in core.ROLES:
        assert cell(role, "adam", "sp") == core.RoleScaling(1.0, 1.0, 1.0, 1.0)
    assert cell("hidden", "sgd", "ntk") == core.RoleScaling(2.0, 0.5, 1.0, 1.0)
    assert cell("input", "adam", "ntk") == core.RoleScaling(1.0, 1.0, 1.0, 1.0)
    # TP5 Table 3 in effective weights (forward multiplier x stored std): output init variance ∝ 1/fan_in²
    # (mup's MuReadout: stored std σ/√fan_in rescaled by √m_in, forward 1/m_in), hidden ∝ 1/fan_in
    for fan_in in (32, 128, 512):
        t = core.build_table({"h": ((fan_in, fan_in), "out_in"), "o": ((10, fan_in), "out_in")},
                             {"h": (32, 32), "o": (10, 32)})
        assert (t["o"].forward_mult * t["o"].init_std) ** 2 * fan_in ** 2 == pytest.approx(32.0)
        assert (t["h"].forward_mult * t["h"].init_std) ** 2 * fan_in == pytest.approx(1.0)
    # rectangular hidden growth under SGD: fan_out / fan_in multipliers
    assert core.role_scaling("hidden", 2.0, 8.0, optimizer="sgd", parameterization="mup").lr_mult == 4.0


def test_depth_gamma_attention_rules():
    assert core.depth_multiplier(None) == 1.0 and core.depth_multiplier(4) == 0.5
    assert core.depth_lr_mult(4, "adam") == 0.5 and core.depth_lr_mult(4, "sgd") == 1.0
    assert core.gamma_output_multiplier(0.1) == pytest.approx(10.0)
    assert core.gamma_lr_scale(0.1, "sgd") == pytest.approx(1e-2)
    assert core.gamma_lr_scale(0.1, "adam") == pytest.approx(0.1)
    assert core.gamma_lr_scale(8.0, "sgd", depth=3) == pytest.approx(4.0)
    assert core.gamma_lr_scale(8.0, "adam", depth=3) == pytest.approx(2.0)
    assert core.attention_scale(64, 16, "1/d") == pytest.approx(4 / 64)
    assert core.attention_scale(16, 16, "1/d") == pytest.approx(1 / 4)
    assert core.attention_scale(64, 16, "1/sqrt(d)") == pytest.approx(1 / 8)
    assert core.optimizer_family("AdamW") == "adam" and core.optimizer_family("momentum") == "sgd"


@pytest.mark.parametrize("kwargs, match", [
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=-1.0), "gamma"),
    (dict(parameterization="mupp"), "parameterization"),
    (dict(optimizer="lbfgs"), "optimizer"),
    (dict(depth=0), "depth"),
    (dict(depth=2), "residual"),
    (dict(overrides={"nope*": "hidden"}), "matches no parameter"),
    (dict(overrides={"a": "middle"}), "overrides"),
    (dict(init_sigma=0.0), "init_sigma"),
    (dict(gamma=2.0, gamma_depth=None, depth=None), None),  # ok: L from the number of weight layers
])
def test_build_table_validation(kwargs, match):
    shapes = {"a": ((64, 8), "out_in"), "b": ((10, 64), "out_in")}
    base = {"a": (32, 8), "b": (10, 32)}
    if match is None:
        core.build_table(shapes, base, **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        core.build_table(shapes, base, **kwargs)


def test_build_table_name_and_shape_mismatch():
    with pytest.raises(ValueError, match="only in the model: \\['c'\\].*only in the base model: \\['b'\\]"):
        core.build_table({"a": ((4, 4), "out_in"), "c": ((4,), "vector")}, {"a": (2, 2), "b": (4,)})
    with pytest.raises(ValueError, match="'a'.*different numbers of dims"):
        core.build_table({"a": ((4, 4), "out_in")}, {"a": (4,)})
    with pytest.raises(ValueError, match="layout"):
        core.build_table({"a": ((4, 4), "sideways")}, {"a": (4, 4)})


# ----------------------------------------------------------------------------------------------- torch tables
def test_torch_mlp_table_by_hand():
    model, base = torch_mlp(128), torch_mlp(32)  # m = 4
    t = tmup.mup_table(model, base, optimizer="adam")
    assert mult(t, "0.weight") == ("input", 1 / math.sqrt(IN), 1.0, 1.0, 1.0)
    assert mult(t, "0.bias") == ("input", None, 1.0, 1.0, 1.0)
    assert mult(t, "2.weight") == ("hidden", 1 / math.sqrt(128), 1.0, 0.25, 4.0)
    assert mult(t, "2.bias") == ("input", None, 1.0, 1.0, 1.0)
    assert mult(t, "4.weight") == ("output", 1 / math.sqrt(32), 0.25, 1.0, 1.0)  # σ/√base_fan_in
    assert mult(t, "4.bias") == ("finite", None, 1.0, 1.0, 1.0)
    s = tmup.mup_table(model, base, optimizer="sgd")
    assert [s[n].lr_mult for n in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")] == [
        4.0, 4.0, 1.0, 4.0, 4.0, 1.0]
    assert s["4.weight"].forward_mult == 0.25 and s["0.weight"].wd_mult == 0.25
    n = tmup.mup_table(model, base, optimizer="sgd", parameterization="ntk")
    assert mult(n, "2.weight") == ("hidden", 2 / math.sqrt(128), 0.5, 1.0, 1.0)
    assert mult(n, "4.weight") == ("output", 2 / math.sqrt(128), 0.5, 1.0, 1.0)
    assert mult(n, "0.weight") == ("input", 1 / math.sqrt(IN), 1.0, 1.0, 1.0)
    sp = tmup.mup_table(model, base, parameterization="sp")
    assert all((x.forward_mult, x.lr_mult, x.wd_mult) == (1.0, 1.0, 1.0) for x in sp.values())
    # gamma on top of muP: output 1/gamma, SGD lr gamma^2 (gamma <= 1) / gamma^(2/L) with L = 3 layers
    g = tmup.mup_table(model, base, optimizer="sgd", gamma=0.5)
    assert g["4.weight"].forward_mult == pytest.approx(0.25 * 2) and g["2.weight"].lr_mult == pytest.approx(0.25)
    assert g["0.weight"].lr_mult == pytest.approx(4 * 0.25) and g["0.weight"].wd_mult == pytest.approx(0.25)
    g = tmup.mup_table(model, base, optimizer="sgd", gamma=8.0)
    assert g["2.weight"].lr_mult == pytest.approx(8.0 ** (2 / 3))
    g = tmup.mup_table(model, base, optimizer="adam", gamma=0.1)
    assert g["2.weight"].lr_mult == pytest.approx(0.25 * 0.1) and g["4.weight"].forward_mult == pytest.approx(2.5)


@pytest.mark.parametrize("width", [64, 128])
def test_torch_transformer_table_by_hand(width):
    m = width / 32
    model, base = TorchGPT(width), TorchGPT(32)
    a = tmup.mup_table(model, base, optimizer="adam", overrides=GPT_OVERRIDES_T)
    assert mult(a, "emb.weight") == ("input", 1.0, 1.0, 1.0, 1.0)
    assert mult(a, "pos") == ("input", 1.0, 1.0, 1.0, 1.0)
    assert mult(a, "blocks.1.ln1.weight") == ("input", None, 1.0, 1.0, 1.0)
    assert mult(a, "blocks.0.attn.qkv.weight") == ("hidden", 1 / math.sqrt(width), 1.0, 1 / m, m)
    assert mult(a, "blocks.0.attn.qkv.bias") == ("input", None, 1.0, 1.0, 1.0)
    assert mult(a, "blocks.1.attn.proj.weight") == ("hidden", 1 / math.sqrt(width), 1.0, 1 / m, m)
    assert mult(a, "blocks.0.mlp.0.weight") == ("hidden", 1 / math.sqrt(width), 1.0, 1 / m, m)
    assert mult(a, "blocks.0.mlp.2.weight") == ("hidden", 1 / math.sqrt(4 * width), 1.0, 1 / m, m)
    assert mult(a, "head.weight") == ("output", math.sqrt(m) / math.sqrt(width), 1 / m, 1.0, 1.0)  # σ/√base_fan_in
    assert mult(a, "head.bias") == ("finite", None, 1.0, 1.0, 1.0)
    # without the override the [T, d] position table reads as a readout (fan-in = d grows): overrides exist for this
    assert tmup.mup_table(model, base)["pos"].role == "output"
    # depth-muP: Adam lr of branch parameters / sqrt(L); LayerNorms outside the branches unchanged
    d = tmup.mup_table(model, base, optimizer="adam", overrides=GPT_OVERRIDES_T, depth=2,
                       residual_branches=GPT_BRANCHES_T)
    r = 1 / math.sqrt(2)
    assert d["blocks.0.attn.qkv.weight"].lr_mult == pytest.approx(r / m)
    assert d["blocks.0.attn.qkv.weight"].wd_mult == pytest.approx(m / r)
    assert d["blocks.1.mlp.2.bias"].lr_mult == pytest.approx(r)
    assert d["blocks.1.ln2.weight"].lr_mult == 1.0 and d["head.weight"].lr_mult == 1.0
    s = tmup.mup_table(model, base, optimizer="sgd", overrides=GPT_OVERRIDES_T, depth=2,
                       residual_branches=GPT_BRANCHES_T)
    assert s["blocks.0.attn.qkv.weight"].lr_mult == 1.0 and s["blocks.0.mlp.2.weight"].lr_mult == 1.0
    assert s["emb.weight"].lr_mult == m and s["blocks.0.attn.qkv.bias"].lr_mult == m
    assert s["head.weight"].lr_mult == m and s["head.bias"].lr_mult == 1.0


# ----------------------------------------------------------------------------------------------- torch behaviour
def test_torch_parameterize_groups_init_and_hooks():
    torch.manual_seed(0)
    model, base = torch_mlp(256), torch_mlp(32)
    groups = tmup.parameterize(model, base, optimizer="adam", lr=1e-3, weight_decay=0.1)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert by_name["2.weight"] == pytest.approx((1e-3 / 8, 0.8))
    assert by_name["0.weight"] == pytest.approx((1e-3, 0.1)) and by_name["4.weight"] == pytest.approx((1e-3, 0.1))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert model[2].weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert model[4].weight.std().item() == pytest.approx(1 / math.sqrt(32), rel=0.1)
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    # the readout's forward multiplier scales W x, not the bias
    x = torch.randn(4, IN)
    h = torch.relu(model[2](torch.relu(model[0](x))))
    expected = h @ model[4].weight.T / 8 + model[4].bias
    assert torch.allclose(model(x), expected, atol=1e-6)
    # calling again replaces (does not stack) the hooks; relative multipliers by default
    groups = tmup.parameterize(model, base, optimizer="adam", reinit=False)
    assert len(model[4]._forward_pre_hooks) == 1
    assert sorted(g["lr"] for g in groups) == [1 / 8, 1.0]
    assert groups.table["4.weight"].forward_mult == 1 / 8
    tmup.remove_parameterization(model)
    assert len(model[4]._forward_pre_hooks) == 0


def test_torch_state_dict_pickle_and_func_round_trip():
    torch.manual_seed(0)
    model, base = torch_mlp(64), torch_mlp(32)
    tmup.parameterize(model, base)
    x = torch.randn(3, IN)
    y = model(x)
    plain = torch_mlp(64)
    assert list(plain.state_dict()) == list(model.state_dict())  # keys unchanged
    other = torch_mlp(64)
    tmup.parameterize(other, base)  # fresh init, same hooks
    other.load_state_dict(model.state_dict())
    assert torch.allclose(other(x), y)
    assert torch.allclose(pickle.loads(pickle.dumps(model))(x), y)
    assert torch.allclose(copy.deepcopy(model)(x), y)
    params = dict(model.named_parameters())
    assert torch.allclose(torch.func.functional_call(model, params, (x,)), y)
    g = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    y.sum().backward()
    assert torch.allclose(g["4.weight"], model[4].weight.grad)


def test_torch_tied_embedding_and_branches():
    torch.manual_seed(0)
    model, base = TorchGPT(64, tied=True), TorchGPT(32, tied=True)
    for opt in ("adam", "sgd"):
        t = tmup.mup_table(model, base, optimizer=opt, overrides=GPT_OVERRIDES_T)
        assert t["emb.weight"].role == "input" and t["head.weight"].role == "output"
        assert t["emb.weight"].lr_mult == t["head.weight"].lr_mult == (1.0 if opt == "adam" else 2.0)
    groups = tmup.parameterize(model, base, overrides=GPT_OVERRIDES_T, depth=2, residual_branches=GPT_BRANCHES_T)
    names = [n for g in groups for n in g["param_names"]]
    assert "head.weight" not in names and names.count("emb.weight") == 1
    assert len(model.head._forward_pre_hooks) == 1 and not model.emb._forward_hooks
    assert len(model.blocks[0].attn._forward_hooks) == 1 and len(model.blocks[1].mlp._forward_hooks) == 1
    assert groups.branch_multiplier == pytest.approx(1 / math.sqrt(2))
    assert groups.attention_scale(32, 16) == pytest.approx(4 / 32)
    idx = torch.randint(0, VOCAB, (2, T))
    assert model(idx).shape == (2, T, VOCAB)
    with pytest.raises(ValueError, match="residual_branches pattern"):
        tmup.parameterize(model, base, depth=2, residual_branches=["blocks.*.ffn"])
    with pytest.raises(ValueError, match="needs depth"):
        tmup.parameterize(model, base, residual_branches=GPT_BRANCHES_T)


def test_torch_validation_errors():
    with pytest.raises(ValueError, match="same parameter names"):
        tmup.parameterize(torch_mlp(64), nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, OUT)))
    with pytest.raises(ValueError, match="gamma"):
        tmup.parameterize(torch_mlp(64), torch_mlp(32), gamma=0)
    with pytest.raises(ValueError, match="parameterization"):
        tmup.parameterize(torch_mlp(64), torch_mlp(32), parameterization="standard")

    class Raw(nn.Module):  # a readout stored as a bare parameter: no module to hook
        def __init__(self, w):
            super().__init__()
            self.inp, self.out = nn.Linear(IN, w), nn.Parameter(torch.zeros(OUT, w))

        def forward(self, x):
            return self.inp(x) @ self.out.T

    model = Raw(64)
    before = model.inp.weight.detach().clone()
    with pytest.raises(ValueError, match="forward multiplier"):
        tmup.parameterize(model, Raw(32))
    assert torch.equal(model.inp.weight, before)  # nothing changed on error
    tmup.parameterize(model, Raw(32), parameterization="sp")  # SP has no multipliers: fine


# ----------------------------------------------------------------------------------------------- jax
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_jax_parameterize_tables_init_and_transform():
    x = jnp.zeros((1, IN))
    params, base = flax_params(FlaxMLP(128), x), flax_shapes(FlaxMLP(32), x)
    mu = jmup.parameterize(params, base, optimizer="adam")
    p = mu.lr_mults["params"]
    assert (p["l0"]["kernel"], p["l2"]["kernel"], p["l4"]["kernel"], p["l4"]["bias"]) == (1.0, 0.25, 1.0, 1.0)
    assert mu.forward_mults["params"]["l4"]["kernel"] == 0.25 and mu.wd_mults["params"]["l2"]["kernel"] == 4.0
    new = mu.init(jax.random.PRNGKey(1), params)
    assert float(new["params"]["l2"]["kernel"].std()) == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert jnp.array_equal(new["params"]["l2"]["bias"], params["params"]["l2"]["bias"])
    eff = mu.apply_multipliers(new)
    assert jnp.allclose(eff["params"]["l4"]["kernel"], new["params"]["l4"]["kernel"] / 4)
    assert eff["params"]["l4"]["bias"] is new["params"]["l4"]["bias"]
    tx = optax.chain(optax.scale_by_adam(), mu.decay(0.0), mu.transform, optax.scale_by_learning_rate(1e-3))
    grads = jax.tree.map(jnp.ones_like, new)
    upd, _ = jax.jit(tx.update)(grads, tx.init(new), new)
    assert float(upd["params"]["l2"]["kernel"][0, 0]) == pytest.approx(-1e-3 / 4, rel=1e-3)
    assert float(upd["params"]["l0"]["kernel"][0, 0]) == pytest.approx(-1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="same parameter names"):
        jmup.parameterize(params, {"params": base["params"]["l0"]})
    with pytest.raises(ValueError, match="gamma"):
        jmup.parameterize(params, base, gamma=-0.5)
    with pytest.raises(ValueError, match="structure"):
        mu.init(jax.random.PRNGKey(0), {"params": params["params"]["l0"]})


# ----------------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("parameterization", ["mup", "sp", "ntk"])
def test_torch_jax_agree_mlp(optimizer, parameterization):
    kw = dict(optimizer=optimizer, parameterization=parameterization, gamma=0.5)
    x = jnp.zeros((1, IN))
    tt = tmup.mup_multipliers(torch_mlp(128), torch_mlp(32), **kw)
    jt = jmup.mup_multipliers(flax_shapes(FlaxMLP(128), x), flax_shapes(FlaxMLP(32), x), **kw)
    assert len(tt) == len(jt) == 6
    for name, v in tt.items():
        assert jt[torch_to_flax_name(name)] == pytest.approx(v), name


@pytest.mark.parametrize("width", [64, 128])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_torch_jax_agree_transformer(width, optimizer):
    idx = jnp.zeros((1, T), jnp.int32)
    kw = dict(optimizer=optimizer, parameterization="mup", depth=2)
    tt = tmup.mup_multipliers(TorchGPT(width), TorchGPT(32), overrides=GPT_OVERRIDES_T,
                              residual_branches=GPT_BRANCHES_T, **kw)
    jt = jmup.mup_multipliers(flax_shapes(FlaxGPT(width), idx), flax_shapes(FlaxGPT(32), idx),
                              overrides=GPT_OVERRIDES_J, residual_branches=GPT_BRANCHES_J, **kw)
    assert len(tt) == len(jt)
    for name, v in tt.items():
        assert jt[torch_to_flax_name(name)] == pytest.approx(v), name


# ----------------------------------------------------------------------------------------------- coordinate check
def _coord_sizes(width: int, parameterization: str, seed: int, lr: float = 3e-2) -> list[float]:
    """RMS of each layer's output after 3 Adam steps (4-layer MLP, base width 32)."""
    def net(w):
        return nn.Sequential(nn.Linear(16, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                             nn.Linear(w, OUT))

    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(100)
    x, y = torch.randn(64, 16, generator=data), torch.randint(0, OUT, (64,), generator=data)
    model = net(width)
    opt = torch.optim.Adam(tmup.parameterize(model, net(32), optimizer="adam", parameterization=parameterization,
                                             lr=lr))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    acts = {}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o)) for i in (0, 2, 4, 6)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [acts[i].pow(2).mean().sqrt().item() for i in (0, 2, 4, 6)]


def test_coordinate_check_mup_vs_sp():
    torch.set_num_threads(1)
    seeds = range(6)

    def ratios(par):
        small = [sum(v) / len(seeds) for v in zip(*[_coord_sizes(64, par, s) for s in seeds])]
        large = [sum(v) / len(seeds) for v in zip(*[_coord_sizes(512, par, s) for s in seeds])]
        return [b / a for a, b in zip(small, large)]

    mup_r, sp_r = ratios("mup"), ratios("sp")
    assert all(abs(r - 1) < 0.25 for r in mup_r), mup_r
    assert any(r >= 2 or r <= 0.5 for r in sp_r), sp_r


def test_zero_readout_and_delta_model_both_backends():
    # base width without delta_model: no readout is known, so gamma's 1/gamma output multiplier has nowhere to
    # go; refused (it applied the gamma learning-rate scale alone)
    with pytest.raises(ValueError, match="no parameter has the output role"):
        tmup.mup_table(torch_mlp(32), torch_mlp(32), optimizer="sgd", gamma=0.5)
    assert tmup.mup_table(torch_mlp(32), torch_mlp(32), optimizer="sgd")["4.weight"].role == "finite"
    # zero_readout likewise (it left the readout at its random init at the base width, where the learning rates
    # are tuned, and zeroed it at every other width), in both backends
    with pytest.raises(ValueError, match="zero_readout=True zeroes"):
        tmup.mup_table(torch_mlp(32), torch_mlp(32), zero_readout=True)
    with pytest.raises(ValueError, match="zero_readout=True zeroes"):
        jmup.mup_table(flax_shapes(FlaxMLP(32), jnp.zeros((1, IN))), flax_shapes(FlaxMLP(32), jnp.zeros((1, IN))),
                       zero_readout=True)
    t = tmup.mup_table(torch_mlp(32), torch_mlp(32), optimizer="sgd", gamma=0.5, delta_model=torch_mlp(64),
                       zero_readout=True)
    assert mult(t, "4.weight") == ("output", 0.0, 2.0, 0.25, 1.0)
    assert mult(t, "2.weight") == ("hidden", 1 / math.sqrt(32), 1.0, 0.25, 1.0)
    model = torch_mlp(128)
    tmup.parameterize(model, torch_mlp(32), zero_readout=True)
    assert torch.count_nonzero(model[4].weight) == 0 and torch.count_nonzero(model[2].weight) > 0
    x = jnp.zeros((1, IN))
    j = jmup.mup_multipliers(flax_shapes(FlaxMLP(32), x), flax_shapes(FlaxMLP(32), x), optimizer="sgd", gamma=0.5,
                             delta_params=flax_shapes(FlaxMLP(64), x), zero_readout=True)
    assert j["params/l4/kernel"] == pytest.approx(tmup.mup_multipliers(
        torch_mlp(32), torch_mlp(32), optimizer="sgd", gamma=0.5, delta_model=torch_mlp(64),
        zero_readout=True)["4.weight"])
    with pytest.raises(ValueError, match="same parameter names"):
        tmup.mup_table(torch_mlp(32), torch_mlp(32), delta_model=TorchGPT(32))


class _ResMLP(nn.Module):
    """``x + fc2(relu(fc1(x)))`` blocks, optionally one block shared across depth (ALBERT-style), and a head
    reachable under a second name (``readout``)."""

    def __init__(self, w: int, depth: int, shared: bool = False, alias: bool = False):
        super().__init__()
        self.inp = nn.Linear(IN, w)
        make = lambda: nn.Sequential(nn.Linear(w, 2 * w), nn.ReLU(), nn.Linear(2 * w, w))  # noqa: E731
        one = make()
        self.blocks = nn.ModuleList([one if shared else make() for _ in range(depth)])
        self.head = nn.Linear(w, 3)
        if alias:
            self.readout = self.head

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def _branch_output_factor(model, block):
    """The factor the hooks put on a block's output (its call with hooks over its bare computation)."""
    x = torch.randn(5, model.inp.out_features)
    with torch.no_grad():
        bare = block[2](block[1](block[0](x)))
        return float((block(x) / bare).mean())


def test_torch_residual_branch_globs_hook_each_block_once():
    """``"blocks.*"`` matches the blocks and everything inside them: only the outermost match is a branch, so a
    block's output is multiplied by 1/sqrt(L) once (it was (1/sqrt(L))^k, k the nested modules matched: 0.039
    instead of 0.25 at L = 16); naming the never-called ModuleList itself is refused (its multiplier never
    applied while the Adam lr was still scaled)."""
    L = 16
    model = _ResMLP(64, L)
    tmup.parameterize(model, _ResMLP(32, L), optimizer="adam", depth=L, residual_branches=["blocks.*"], reinit=False)
    assert _branch_output_factor(model, model.blocks[3]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ModuleList, which is never called"):
        tmup.parameterize(_ResMLP(64, L), _ResMLP(32, L), optimizer="adam", depth=L, residual_branches=["blocks"])


def test_torch_shared_block_and_aliased_head_get_one_hook_each():
    """A block shared across depth gets the branch multiplier once per call (and its parameters one role, not a
    'tied parameter' error), and a head reachable under two names its 1/m readout multiplier once (it got two
    hooks: 1/m²)."""
    L = 4
    model = _ResMLP(64, L, shared=True, alias=True)
    tmup.parameterize(model, _ResMLP(32, L, shared=True, alias=True), optimizer="adam", depth=L,
                      residual_branches=["blocks.*"], reinit=False)
    assert _branch_output_factor(model, model.blocks[2]) == pytest.approx(0.5)
    h = torch.randn(5, 64)
    with torch.no_grad():
        bare = h @ model.head.weight.T * 0.5 + model.head.bias  # readout multiplier 1/m = 1/2 on W h
        torch.testing.assert_close(model.head(h), bare)


class _TiedHeadFirst(nn.Module):
    """A language-model head registered before the embedding it shares its weight with."""

    def __init__(self, d: int):
        super().__init__()
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.emb = nn.Embedding(VOCAB, d)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.emb(tokens))


def test_torch_tied_embedding_is_drawn_as_the_embedding_whichever_registers_first():
    """The shared tensor gets the embedding's init std (σ, Θ(1) coordinates), not the readout's (it took the
    first-registered view's: σ/√base_d, and zero with zero_readout=True), and the head keeps its 1/m forward
    multiplier; a keyword call (``head(input=h)``) goes through the input hook too."""
    torch.manual_seed(0)
    model = _TiedHeadFirst(256)
    tmup.parameterize(model, _TiedHeadFirst(64), optimizer="adam", zero_readout=True,
                      overrides={"emb.weight": "embedding", "head.weight": "output"})
    assert model.emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    h = torch.randn(3, 256)
    with torch.no_grad():
        torch.testing.assert_close(model.head(input=h), h @ model.emb.weight.T / 4)


class _FlaxAttention(fnn.Module):
    width: int

    @fnn.compact
    def __call__(self, x):
        return fnn.MultiHeadDotProductAttention(num_heads=4, qkv_features=self.width, out_features=self.width)(
            fnn.Dense(self.width)(x))


class _TorchAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed = nn.Linear(IN, width)
        self.attn = nn.MultiheadAttention(width, 4)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_flax_attention_kernels_and_biases_read_like_torch_multihead_attention():
    """Flax's attention stores query/key/value kernels ``[in, heads, head_dim]`` and biases ``[heads, head_dim]``:
    read as ``[*kernel, in, out]`` the kernels had fan-in ``in * heads`` (init and learning rate off by the head
    count) and the biases were weights re-initialised at random. They now get the numbers of PyTorch's
    ``in_proj_weight [3 width, width]`` (fan-in ``width``) and stay zero, in linen and in nnx."""
    from flax import nnx

    x = jnp.zeros((1, 5, IN))
    linen = jmup.mup_table(flax_shapes(_FlaxAttention(128), x), flax_shapes(_FlaxAttention(32), x))
    torch_t = tmup.mup_table(_TorchAttention(128), _TorchAttention(32))
    ref = torch_t["attn.in_proj_weight"]
    for part in ("query", "key", "value"):
        kernel = linen[f"params/MultiHeadDotProductAttention_0/{part}/kernel"]
        assert (kernel.layout, kernel.role, kernel.fan_in) == ("in_heads", "hidden", 128)
        assert kernel.init_std == pytest.approx(ref.init_std) and kernel.lr_mult == pytest.approx(ref.lr_mult)
        bias = linen[f"params/MultiHeadDotProductAttention_0/{part}/bias"]
        assert (bias.layout, bias.init_std, bias.lr_mult) == ("vector", None, 1.0)
    out = linen["params/MultiHeadDotProductAttention_0/out/kernel"]
    assert out.init_std == pytest.approx(torch_t["attn.out_proj.weight"].init_std) and out.fan_in == 128

    params = _FlaxAttention(128).init(jax.random.key(0), x)
    mup = jmup.parameterize(params, flax_shapes(_FlaxAttention(32), x))
    new = mup.init(jax.random.key(1), params)["params"]["MultiHeadDotProductAttention_0"]
    assert not jnp.any(new["query"]["bias"])  # flax's zeros, not redrawn
    assert float(jnp.std(new["query"]["kernel"])) == pytest.approx(ref.init_std, rel=0.1)

    def nnx_state(width):
        return nnx.state(nnx.MultiHeadAttention(num_heads=4, in_features=width, qkv_features=width, decode=False,
                                                rngs=nnx.Rngs(0)), nnx.Param)
    table = jmup.mup_table(nnx_state(128), nnx_state(32))
    assert table["query/kernel/value"].layout == "in_heads" and table["query/kernel/value"].fan_in == 128
    assert table["value/bias/value"].layout == "vector"


class _FlaxBlock(fnn.Module):
    width: int

    @fnn.compact
    def __call__(self, h, _):
        a = fnn.MultiHeadDotProductAttention(num_heads=self.width // 8)(h[:, None, :])[:, 0]
        return h + fnn.Dense(self.width)(fnn.relu(h + a)), None


class _FlaxStack(fnn.Module):
    """Residual blocks (attention + Dense), unrolled or as one ``nn.scan`` (every block leaf ``[L, ...]``)."""

    width: int
    scan: bool
    depth: int = 4

    @fnn.compact
    def __call__(self, x):
        h = fnn.Dense(self.width)(x)
        if self.scan:
            blocks = fnn.scan(_FlaxBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                              length=self.depth)(self.width, name="blocks")
            h, _ = blocks(h, None)
        else:
            for i in range(self.depth):
                h, _ = _FlaxBlock(self.width, name="blocks" if i == 0 else f"blocks_{i}")(h, None)
        return fnn.Dense(OUT)(h)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_stacked_layers_are_scaled_as_their_unstacked_layers():
    """Found in the field: the layer axis of an ``nn.scan`` stack was read as fan-in, so the stacked attention
    kernels became readouts (their forward multiplier 1/16), the Dense kernels started sqrt(L) too small, and
    the γ rule counted a stack once. With ``stacked=`` every block leaf gets the unrolled model's numbers, also
    against a base of another depth."""
    x = jnp.zeros((2, IN))
    key = jax.random.key(0)
    unrolled = _FlaxStack(128, False).init(key, x)
    want = jmup.mup_table(unrolled, flax_shapes(_FlaxStack(32, False), x), gamma=2.0)
    params = _FlaxStack(128, True).init(key, x)
    wrong = jmup.mup_table(params, flax_shapes(_FlaxStack(32, True), x), gamma=2.0)
    assert wrong["params/blocks/MultiHeadDotProductAttention_0/query/kernel"].role == "output"  # the old reading
    for base_depth in (4, 2):
        mup = jmup.parameterize(params, flax_shapes(_FlaxStack(32, True, base_depth), x), gamma=2.0,
                                stacked={"params/blocks/*": 1})
        for name, row in mup.table.items():
            ref = want[name]
            assert (row.role, row.layout, row.fan_in) == (ref.role, ref.layout, ref.fan_in), name
            for attr in ("forward_mult", "lr_mult", "wd_mult"):
                assert getattr(row, attr) == pytest.approx(getattr(ref, attr), rel=1e-12), (name, attr)
            assert (row.init_std is None) == (ref.init_std is None), name
            if ref.init_std is not None:
                assert row.init_std == pytest.approx(ref.init_std, rel=1e-12), name
        kernel = mup.init(jax.random.key(1), params)["params"]["blocks"]["Dense_0"]["kernel"]
        assert kernel.shape == (4, 128, 128)
        assert float(jnp.std(kernel)) == pytest.approx(128 ** -0.5, rel=0.02)
    with pytest.raises(ValueError, match="leading layer axes"):
        jmup.parameterize(params, params, stacked={"params/blocks/*": 0})
    with pytest.raises(ValueError, match="matches no parameter"):
        jmup.parameterize(params, params, stacked={"params/layers/*": 1})


class _TorchTokens(nn.Module):
    """timm's ViT tokens: ``cls_token [1, 1, d]`` and ``pos_embed [1, T, d]``, added to the activations."""

    def __init__(self, width):
        super().__init__()
        self.embed = nn.Linear(IN, width)
        self.cls_token = nn.Parameter(torch.full((1, 1, width), 0.02))
        self.pos_embed = nn.Parameter(torch.full((1, T, width), 0.02))
        self.head = nn.Linear(width, OUT)


def test_torch_layouts_make_timm_tokens_vectors():
    """Read as ``[out, in, ...]`` the tokens' width axis is fan-in: they were taken for readouts (output role,
    redrawn). ``layouts={...: "vector"}`` makes them what they are, input-like tensors every axis of which is
    fan-out, kept as the model initialised them, at the Adam rate of an input weight, as in the JAX backend."""
    kw = dict(optimizer="adam")
    wrong = tmup.mup_table(_TorchTokens(128), _TorchTokens(32), **kw)
    assert wrong["pos_embed"].role == "output"
    lay = {"cls_token": "vector", "pos_embed": "vector"}
    table = tmup.mup_table(_TorchTokens(128), _TorchTokens(32), layouts=lay, **kw)
    for name in lay:
        assert (table[name].layout, table[name].role, table[name].init_std, table[name].lr_mult) == (
            "vector", "input", None, 1.0)
    model = _TorchTokens(128)
    groups = tmup.parameterize(model, _TorchTokens(32), layouts=lay, **kw)
    assert torch.all(model.pos_embed == 0.02) and torch.all(model.cls_token == 0.02)
    assert {n for g in groups for n in g["param_names"]} == {n for n, _ in model.named_parameters()}
    jax_table = jmup.mup_table({"pos_embed": jnp.zeros((1, T, 128))}, {"pos_embed": jnp.zeros((1, T, 32))},
                               layouts={"pos_embed": "vector"}, **kw)
    assert jax_table["pos_embed"].lr_mult == table["pos_embed"].lr_mult
    with pytest.raises(ValueError, match="layouts pattern 'nope' matches no parameter"):
        tmup.mup_table(_TorchTokens(128), _TorchTokens(32), layouts={"nope": "vector"})
    with pytest.raises(ValueError, match="layouts"):
        tmup.mup_table(_TorchTokens(128), _TorchTokens(32), layouts={"pos_embed": "sideways"})


def test_gamma_depth_and_builtin_attention_both_backends():
    """The γ rule's ``L`` defaults to the count of weight tensors, so one attention block written with torch's
    packed ``in_proj_weight`` (2 tensors) and with flax's separate query/key/value/out kernels (4) gets other
    learning-rate scales; ``gamma_depth`` fixes ``L`` in both (the same numbers). Under μP's 1/d attention, a
    built-in attention module, whose scale is 1/sqrt(head_dim), warns in both backends."""
    x = jnp.zeros((1, 5, IN))
    with pytest.warns(RuntimeWarning, match="1/sqrt"):
        tmup.parameterize(_TorchAttention(128), _TorchAttention(32))
    with pytest.warns(RuntimeWarning, match="1/sqrt"):
        jmup.parameterize(flax_shapes(_FlaxAttention(128), x), flax_shapes(_FlaxAttention(32), x))
    # the output projection stands in for a readout (γ needs one)
    t_kw = dict(optimizer="sgd", gamma=4.0, overrides={"attn.out_proj.weight": "output"})
    f_out = "params/MultiHeadDotProductAttention_0/out/kernel"

    def torch_lr(**k):
        return tmup.mup_table(_TorchAttention(128), _TorchAttention(32), **t_kw, **k)["embed.weight"].lr_mult

    def flax_lr(**k):
        return jmup.mup_table(flax_shapes(_FlaxAttention(128), x), flax_shapes(_FlaxAttention(32), x),
                              optimizer="sgd", gamma=4.0, overrides={f_out: "output"},
                              **k)["params/Dense_0/kernel"].lr_mult
    assert flax_lr() != pytest.approx(torch_lr())  # L = 5 weight tensors in flax, 3 in torch
    for depth in (2, 6):
        assert torch_lr(gamma_depth=depth) == pytest.approx(flax_lr(gamma_depth=depth))
    # independently of the core's table: SGD's γ > 1 scale is γ^(2/L), and the defaults are L = 3 and 5
    assert torch_lr(gamma_depth=2) / torch_lr(gamma_depth=6) == pytest.approx(4.0 ** (2 / 2 - 2 / 6))
    assert torch_lr() == pytest.approx(torch_lr(gamma_depth=3))
    assert flax_lr() == pytest.approx(flax_lr(gamma_depth=5))


class _PaddedEmbedding(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.emb = nn.Embedding(10, width, padding_idx=0)
        self.head = nn.Linear(width, 10)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_torch_reinit_keeps_the_padding_row_at_zero():
    """The re-initialisation drew the padding row too (torch keeps it 0 and it gets no gradient: a pad token then
    added a fixed random vector for good)."""
    torch.manual_seed(0)
    model = _PaddedEmbedding(64)
    tmup.parameterize(model, _PaddedEmbedding(16))
    assert model.emb.weight[0].abs().max().item() == 0.0 and model.emb.weight[1:].std().item() > 0.5


def test_torch_parameterize_after_a_submodule_was_parameterized_hooks_once():
    """parameterize(model.net, ...) then parameterize(model, ...): the submodule's hooks go (the readout took its
    1/m multiplier twice: output x 0.25 at width 4 x the base)."""
    class Wrapped(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.net = torch_mlp(w)

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    once, twice = Wrapped(256), Wrapped(256)
    twice.load_state_dict(once.state_dict())
    tmup.parameterize(once, Wrapped(64), reinit=False)
    tmup.parameterize(twice.net, Wrapped(64).net, reinit=False)
    tmup.parameterize(twice, Wrapped(64), reinit=False)
    x = torch.randn(5, IN)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), once(x))
    tmup.remove_parameterization(twice)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twice.modules())
    # the other order: the model first, then its submodule (its readout took 1/m twice: 1/16 for 1/4), and
    # removing from the submodule removes what the model's call installed there
    tmup.parameterize(twice, Wrapped(64), reinit=False)
    tmup.parameterize(twice.net, Wrapped(64).net, reinit=False)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), once(x))
    tmup.remove_parameterization(twice.net)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twice.modules())


class _TiedPadded(nn.Module):
    """A head registered before the padded embedding it shares its weight with."""

    def __init__(self, d: int):
        super().__init__()
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.emb = nn.Embedding(VOCAB, d, padding_idx=0)
        self.head.weight = self.emb.weight


def test_torch_tied_padded_embedding_keeps_its_pad_row_whichever_registers_first():
    """The pad row was zeroed only when the first name of the shared tensor was the embedding's."""
    torch.manual_seed(0)
    model = _TiedPadded(64)
    tmup.parameterize(model, _TiedPadded(16))
    assert model.emb.weight[0].abs().max().item() == 0.0 and model.emb.weight[1:].std().item() > 0.5


class _Attn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)

    def forward(self, h):
        return h + self.mha(h, h, h, need_weights=False)[0]


def test_torch_multihead_attention_out_proj_is_refused_and_the_attention_scales_as_a_branch():
    """nn.MultiheadAttention never calls its out_proj (F.multi_head_attention_forward reads the weight): a
    forward multiplier or a branch multiplier hooked there did nothing, silently; both are refused. The attention
    module as a residual branch has its attention output scaled (its (output, weights) tuple was a TypeError at
    the first forward)."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="never calls its out_proj"):
        tmup.parameterize(_Attn(64), _Attn(16), parameterization="ntk", overrides={"mha.in_proj_weight": "input"})
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        tmup.parameterize(_Attn(64), _Attn(16), depth=4, residual_branches=["mha.out_proj"], reinit=False)
    model, h = _Attn(64), torch.randn(2, 5, 64)
    with torch.no_grad():
        branch = model.mha(h, h, h, need_weights=False)[0]
        tmup.parameterize(model, _Attn(16), depth=4, residual_branches=["mha"], reinit=False, attention="1/sqrt(d)")
        torch.testing.assert_close(model(h), h + 0.5 * branch)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_mup_transform_and_decay_inside_masked_and_multi_transform():
    """Found in the field: ``scale_by_mup`` (documented as chainable anywhere) raised a MaskedNode pytree error
    inside ``optax.multi_transform``, and so did a tuner behind it there (the noise metric's multipliers)."""
    from curvopt.optax import cdat

    params = {"a": jnp.ones((4, 8)), "b": jnp.full((8, 3), 0.5), "c": jnp.ones(3)}
    mults = {"a": 2.0, "b": 0.25, "c": 1.0}
    labels = {"a": "frozen", "b": "train", "c": "train"}
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    full = optax.chain(jmup.add_decayed_weights_mup(0.1, mults), jmup.scale_by_mup(mults))
    want, _ = full.update(grads, full.init(params), params)
    split = optax.multi_transform({"train": full, "frozen": optax.set_to_zero()}, labels)
    got, _ = split.update(grads, split.init(params), params)
    assert not jnp.any(got["a"])
    for k in ("b", "c"):
        assert jnp.allclose(got[k], want[k], rtol=1e-6)
    masked = optax.masked(jmup.scale_by_mup(mults), {"a": False, "b": True, "c": True})
    got, _ = masked.update(grads, masked.init(params), params)
    assert jnp.array_equal(got["a"], grads["a"]) and jnp.allclose(got["b"], 0.25 * grads["b"])
    tuned = optax.multi_transform({"train": cdat(optax.chain(optax.scale_by_adam(), jmup.scale_by_mup(mults)),
                                                 base_method="adam"), "frozen": optax.set_to_zero()}, labels)
    state = tuned.init(params)
    for _ in range(3):
        u, state = jax.jit(tuned.update)(grads, state, params)
        params = optax.apply_updates(params, u)
        grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert jnp.array_equal(params["a"], jnp.ones((4, 8)))


class _FrozenStem(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.stem = nn.Linear(IN, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(torch.tanh(self.stem(x)))))


def test_torch_reinit_keeps_frozen_parameters():
    """A frozen (pretrained) layer was redrawn like the rest: its values were lost without a word. It keeps them;
    the trained weights are still redrawn at the table's scale."""
    torch.manual_seed(0)
    model = _FrozenStem(256)
    with torch.no_grad():
        model.stem.weight.fill_(0.5)
    model.stem.requires_grad_(False)
    body_before = model.body.weight.clone()
    table = tmup.mup_table(_FrozenStem(256), _FrozenStem(64))
    tmup.parameterize(model, _FrozenStem(64))
    assert torch.all(model.stem.weight == 0.5)
    assert not torch.equal(model.body.weight, body_before)
    assert model.body.weight.std().item() == pytest.approx(table["body.weight"].init_std, rel=0.05)


class _BiasKV(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed = nn.Linear(IN, width)
        self.attn = nn.MultiheadAttention(width, 4, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_torch_multihead_attention_bias_kv_are_vectors():
    """add_bias_kv's bias_k / bias_v ([1, 1, d]) were read as [out, in] weights whose fan-in grows: taken for
    readouts (forward multiplier 1/m, which parameterize then refused). They are rows appended to the keys and
    values: vectors, kept as initialised, at an input weight's Adam rate."""
    table = tmup.mup_table(_BiasKV(256), _BiasKV(64))
    for name in ("attn.bias_k", "attn.bias_v"):
        assert (table[name].layout, table[name].role, table[name].init_std, table[name].lr_mult,
                table[name].forward_mult) == ("vector", "input", None, 1.0, 1.0)
    model = _BiasKV(256)
    kept = model.attn.bias_k.clone()
    with pytest.warns(RuntimeWarning, match="1/sqrt"):
        tmup.parameterize(model, _BiasKV(64))
    assert torch.equal(model.attn.bias_k, kept)


def test_a_model_whose_readout_is_not_recognised_warns_in_both_backends():
    """A last layer as wide as the model (or a class count that grows with it) is read as hidden: under μP with
    γ = 1 no parameter got the output role, and the readout's 1/m applied to none, silently (γ != 1 raises). It
    warns; naming the readout in overrides gives it the role, and a model with a readout does not warn."""
    def headless(w):
        return nn.Sequential(nn.Linear(IN, w), nn.ReLU(), nn.Linear(w, w))
    with pytest.warns(RuntimeWarning, match="no parameter has the output role"):
        tmup.parameterize(headless(128), headless(32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = tmup.parameterize(headless(128), headless(32), overrides={"2.weight": "output"})
        assert groups.table["2.weight"].role == "output"
        tmup.parameterize(torch_mlp(128), torch_mlp(32))
        jmup.parameterize(flax_shapes(FlaxMLP(128), jnp.zeros((1, IN))), flax_shapes(FlaxMLP(32), jnp.zeros((1, IN))))
        tmup.parameterize(headless(128), headless(32), parameterization="sp")  # SP has no readout rule
    x = jnp.zeros((1, IN))

    class Headless(fnn.Module):
        w: int

        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(self.w)(fnn.relu(fnn.Dense(self.w)(x)))
    with pytest.warns(RuntimeWarning, match="no parameter has the output role"):
        jmup.parameterize(flax_shapes(Headless(128), x), flax_shapes(Headless(32), x))


def test_scale_by_mup_init_takes_integer_leaves():
    """Its multipliers are kept in the accumulator dtype of the floating leaves (a step counter in the params
    tree made init refuse the tree once the dtype was read from every leaf)."""
    import jax.numpy as jnp
    from jax_backend import scale_by_mup
    params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
    state = scale_by_mup({"w": 0.5, "step": 1.0}).init(params)
    assert float(state.lr_mults["w"]) == 0.5 and state.lr_mults["w"].dtype == jnp.float32


class _Norm2d(nn.Module):
    """Features ``[B, width, 4]`` normalised over both trailing axes, then a weight-normalised hidden layer."""

    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(IN, 4 * width)
        self.ln = nn.LayerNorm((width, 4))
        self.mid = nn.utils.parametrizations.weight_norm(nn.Linear(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, 3)

    def forward(self, x):
        h = self.ln(self.inp(x).view(x.shape[0], -1, 4)).flatten(1)
        return self.head(torch.tanh(self.mid(h)))


def test_torch_2d_norm_gains_biases_and_weight_norm_magnitudes_are_vectors():
    """Only 0-d/1-d tensors were vectors: ``LayerNorm((width, 4))``'s gain and bias were read as [out, in] input
    weights and redrawn (gain mean 0.005, std 0.52 where torch starts it at 1), ``LayerNorm((4, width))``'s taken
    for a readout and refused, and weight_norm's magnitude ``[out, 1]`` redrawn from N(0, 1) (14 of 32 rows
    negative): a field test. Flax read the same layer's leaves as vectors. They keep their values now."""
    torch.manual_seed(0)
    model = _Norm2d(32)
    gain, bias = model.ln.weight.clone(), model.ln.bias.clone()
    magnitude = model.mid.parametrizations.weight.original0.clone()
    groups = tmup.parameterize(model, _Norm2d(8))
    for name in ("ln.weight", "ln.bias", "mid.parametrizations.weight.original0"):
        assert (groups.table[name].layout, groups.table[name].init_std) == ("vector", None), name
    assert groups.table["mid.parametrizations.weight.original1"].role == "hidden"
    assert torch.equal(model.ln.weight, gain) and torch.equal(model.ln.bias, bias)
    assert torch.equal(model.mid.parametrizations.weight.original0, magnitude)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecated weight_norm: weight_g, weight_v

        def old(w):
            return nn.Sequential(nn.Linear(IN, w), nn.Tanh(), nn.utils.weight_norm(nn.Linear(w, w)), nn.Linear(w, 3))
        model = old(32)
        magnitude = model[2].weight_g.clone()
        table = tmup.parameterize(model, old(8)).table
    assert table["2.weight_g"].layout == "vector" and table["2.weight_v"].role == "hidden"
    assert torch.equal(model[2].weight_g, magnitude)

    class NormWithProjection(nn.LayerNorm):  # a norm subclass's own weight is still a weight
        def __init__(self, w):
            super().__init__(w)
            self.proj = nn.Parameter(torch.randn(w, w))
    table = tmup.mup_table(NormWithProjection(32), NormWithProjection(8))
    assert (table["proj"].layout, table["proj"].role, table["weight"].layout) == ("out_in", "hidden", "vector")
    x = jnp.zeros((1, 6, IN))

    class Norm2d(fnn.Module):  # the same LayerNorm in flax: its leaves were vectors already
        w: int

        @fnn.compact
        def __call__(self, x):
            h = fnn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1))(fnn.Dense(self.w)(x))
            return fnn.Dense(3)(h.reshape(1, -1))
    table = jmup.mup_table(flax_shapes(Norm2d(32), x), flax_shapes(Norm2d(8), x))
    for leaf in ("params/LayerNorm_0/scale", "params/LayerNorm_0/bias"):
        assert (table[leaf].layout, table[leaf].init_std) == ("vector", None)


def test_flax_dense_general_onto_several_axes_read_as_a_readout_warns():
    """``DenseGeneral(features=(3, heads, 4))`` named ``qkv``: its kernel ``[in, 3, heads, 4]`` read as ``[*kernel,
    in, out]`` had ``in`` and ``heads`` as fan-in and only ``4`` as fan-out, so it became a readout inside the
    network (forward multiplier 1/16), silently (a field test). It warns, naming ``layouts=``, which reads it as
    the hidden weight it is; an overridden readout and a model with one readout do not warn."""
    x = jnp.ones((1, 6, 5))

    class Block(fnn.Module):
        heads: int

        @fnn.compact
        def __call__(self, x):
            h = fnn.Dense(4 * self.heads, name="inp")(x)
            qkv = fnn.DenseGeneral((3, self.heads, 4), name="qkv")(h)
            a = fnn.dot_product_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :])
            return fnn.Dense(3, name="head")(h + fnn.DenseGeneral(4 * self.heads, axis=(-2, -1), name="o")(a))
    wide, base = flax_shapes(Block(8), x), flax_shapes(Block(2), x)
    with pytest.warns(RuntimeWarning, match=r"\['params/qkv/kernel'\] read as readouts.*in_heads"):
        jmup.parameterize(wide, base, attention="1/sqrt(d)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = jmup.parameterize(wide, base, attention="1/sqrt(d)", layouts={"params/qkv/kernel": "in_heads"})
        jmup.parameterize(wide, base, attention="1/sqrt(d)", overrides={"params/qkv/kernel": "output"})
    assert (fixed.table["params/qkv/kernel"].role, fixed.table["params/qkv/kernel"].forward_mult) == ("hidden", 1.0)
    assert fixed.table["params/qkv/kernel"].init_std == pytest.approx(1 / math.sqrt(32))

    class TwoHeads(fnn.Module):  # readouts of [heads, 4] features: [heads, 4, out] kernels, read right
        heads: int

        @fnn.compact
        def __call__(self, x):
            h = fnn.Dense(4 * self.heads)(x).reshape(*x.shape[:-1], self.heads, 4)
            return (fnn.DenseGeneral(3, axis=(-2, -1), name="policy")(h),
                    fnn.DenseGeneral(1, axis=(-2, -1), name="critic")(h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = jmup.parameterize(flax_shapes(TwoHeads(8), x), flax_shapes(TwoHeads(2), x)).table
    assert table["params/policy/kernel"].role == table["params/critic/kernel"].role == "output"
