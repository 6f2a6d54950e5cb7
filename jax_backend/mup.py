"""μP / depth-μP / γ for JAX/Optax: per-leaf multipliers from two pytrees of shapes.

The numbers come from :mod:`curvopt.mup` (the same table as the PyTorch backend). Leaf names are the pytree
paths joined by ``/`` (``"params/Dense_0/kernel"`` for a Flax param dict). Tensors are read in Flax's layout
``[*kernel, in, out]`` by default (``layouts={glob: "out_in"}`` for PyTorch-style arrays); 0-d/1-d leaves
and every ``bias``/``scale`` leaf are vectors (biases, norm gains), and the 3-d ``query``/``key``/``value``
kernels of Flax's attention are ``[in, heads, head_dim]`` (layout ``in_heads``). Flax ``nn.Embed`` tables look
like Dense kernels ``[vocab, dim]`` — same role and learning rate — but their init should ignore the
vocabulary: pass ``overrides={path: "embedding"}``. Leaves that stack layers (``nn.scan``: ``[L, in, out]``)
need ``stacked={glob: 1}``: the leading axes are then neither fan-in nor width.

Usage::

    mup = parameterize(params, base_params, optimizer="adam")        # params/base_params: arrays or shapes
    params = mup.init(key, params)                                   # re-initialise per the table
    loss = lambda p, x, y: xent(model.apply(mup.apply_multipliers(p), x), y)   # forward multipliers
    tx = curvopt.optax.cdat(optax.chain(optax.scale_by_adam(), mup.transform), base_method="adam")  # or
    tx = optax.chain(optax.scale_by_adam(), mup.transform, optax.scale_by_learning_rate(lr))

``apply_multipliers`` multiplies each leaf by its forward multiplier (μP/NTK readout ``1/m``, γ's ``1/γ``)
*inside* the differentiated function, which is exactly the multiplier form (the gradient of the stored leaf
is ``c`` times the effective one). Biases are never scaled. The depth-μP residual-branch multiplier
``1/sqrt(L)`` is a property of the forward pass: read ``mup.branch_multiplier`` in your model.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from curvopt import mup as core
from curvopt.validation import check_nonnegative

from .direction import accumulator_dtype, like_params
from .warning import warn

__all__ = ["parameterize", "mup_table", "mup_multipliers", "scale_by_mup", "ScaleByMupState", "find_lr_mults",
           "add_decayed_weights_mup", "MuP"]


def _name(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(getattr(k, "key", k)))
    return "/".join(parts)


def _named_shapes(tree: Any, what: str) -> tuple[dict[str, tuple], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in leaves:
        if not hasattr(leaf, "shape"):
            raise ValueError(f"{what}: leaf {_name(path)!r} has no shape (pass arrays or jax.ShapeDtypeStruct)")
        out[_name(path)] = tuple(int(s) for s in leaf.shape)
    return out, treedef


def _default_layout(name: str, shape: tuple[int, ...]) -> str:
    """Flax's layout of a leaf: a ``bias``/``scale`` leaf or a 0-d/1-d one is a vector (attention's biases are
    ``[heads, head_dim]``), a 3-d ``query``/``key``/``value`` kernel is attention's ``[in, heads, head_dim]``
    (``in_heads``), any other ``[*kernel, in, out]``. An ``nnx`` state's paths end in the variable's ``value``."""
    parts = name.split("/")
    if len(parts) > 2 and parts[-1] == "value" and parts[-2] in ("kernel", "bias", "scale"):
        parts = parts[:-1]
    if len(shape) <= 1 or parts[-1] in ("bias", "scale"):
        return "vector"
    if len(shape) == 3 and parts[-1] == "kernel" and len(parts) > 1 and parts[-2] in ("query", "key", "value"):
        return "in_heads"
    return "in_out"


def mup_table(params: Any, base_params: Any, *, optimizer: str = "adam", parameterization: str = "mup",
              gamma: float = 1.0, depth: int | None = None, overrides: Mapping[str, str] | None = None,
              residual_branches: Sequence[str] | None = None, layouts: Mapping[str, str] | None = None,
              init_sigma: float = 1.0, zero_readout: bool = False, delta_params: Any = None,
              gamma_depth: int | None = None, stacked: Mapping[str, int] | None = None) -> dict:
    """``{leaf name: curvopt.mup.ParamScaling}``; the arguments of :func:`parameterize` but ``attention`` (a
    stacked leaf's row has one layer's shape)."""
    shapes, _ = _named_shapes(params, "params")
    base_shapes, _ = _named_shapes(base_params, "base_params")
    core.check_same_names(shapes, base_shapes)
    delta_shapes = None if delta_params is None else _named_shapes(delta_params, "delta_params")[0]
    counts = {}
    for pat, hits in core.match_names((stacked or {}).keys(), shapes, "stacked").items():
        axes = stacked[pat]
        if not isinstance(axes, int) or isinstance(axes, bool) or axes < 1:
            raise ValueError(f"stacked[{pat!r}] must be the number of leading layer axes (an int >= 1), "
                             f"got {axes!r}")
        for n in hits:
            if len(shapes[n]) <= axes:
                raise ValueError(f"stacked[{pat!r}]: {n!r} of shape {shapes[n]} has no axes left after {axes} "
                                 "layer axes")
            counts[n] = math.prod(shapes[n][:axes])
            for tree in (shapes, base_shapes) + ((delta_shapes,) if delta_shapes is not None else ()):
                tree[n] = tree[n][axes:]
    layout = core.with_layouts({n: _default_layout(n, s) for n, s in shapes.items()}, layouts)
    in_branch: list[str] = []
    if residual_branches:
        if depth is None:
            raise ValueError("residual_branches needs depth (the number of residual blocks L)")
        for hits in core.match_names(residual_branches, shapes, "residual_branches").values():
            in_branch += hits
    return core.build_table(
        {n: (s, layout[n]) for n, s in shapes.items()}, base_shapes, optimizer=optimizer,
        parameterization=parameterization, gamma=gamma, depth=depth, residual_branch=in_branch,
        overrides=overrides, init_sigma=init_sigma, zero_readout=zero_readout, gamma_depth=gamma_depth,
        delta_shapes=delta_shapes, tensor_counts=counts)


def mup_multipliers(params: Any, base_params: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """``{name: {"role", "init_std", "forward_mult", "lr_mult", "wd_mult"}}``: :func:`mup_table` as numbers."""
    return core.table_numbers(mup_table(params, base_params, **kwargs))


class ScaleByMupState(NamedTuple):
    """The multipliers of :func:`scale_by_mup` (scalars in the tuners' accumulator dtype: float32, float64
    under x64 with float64 parameters; shaped like the parameters' tree, without ``nnx``
    variable nodes: :func:`_pure`), kept so that a tuner handed the base's state reads them (the secant's noise
    metric, :mod:`jax_backend.noise`); those of the last update."""

    lr_mults: Any


def find_lr_mults(tree: Any) -> Any:
    """The multipliers of the first :class:`ScaleByMupState` in an optimizer state, or None."""
    is_mup = lambda x: isinstance(x, ScaleByMupState)  # noqa: E731
    return next((node.lr_mults for node in jax.tree.leaves(tree, is_leaf=is_mup) if is_mup(node)), None)


def find_whole_lr_mults(tree: Any) -> Any:
    """The multipliers of the one :class:`ScaleByMupState` of an optimizer state that applies to every leaf, or
    None: none, several, or one inside ``optax.masked`` / ``optax.multi_transform`` (whose state records the
    multipliers of every leaf, also of those its mask leaves unscaled)."""
    stop = lambda x: isinstance(x, (ScaleByMupState, optax.MaskedState, optax.MultiTransformState))  # noqa: E731
    nodes = [node for node in jax.tree.leaves(tree, is_leaf=stop) if stop(node)]
    whole = [node for node in nodes if isinstance(node, ScaleByMupState)]
    nested = any(find_lr_mults(node) is not None for node in nodes if not isinstance(node, ScaleByMupState))
    return whole[0].lr_mults if len(whole) == 1 and not nested else None


def _pure(tree: Any) -> Any:
    """``tree`` with flax ``nnx`` variables replaced by their values (``nnx.as_pure``), as ``nnx.Optimizer`` hands a
    transform its state: multipliers built from an ``nnx.State`` kept their ``Param`` nodes in the state ``init``
    made, which a tuner's check of the state it is handed then refused (a field test: μP under ``nnx.Optimizer``
    with ``cdat``). Other trees unchanged (without ``flax.nnx`` imported there are no such variables)."""
    nnx = sys.modules.get("flax.nnx")
    return tree if nnx is None else nnx.as_pure(tree)


def scale_by_mup(lr_mults: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its (Python float) multiplier; chainable anywhere, inside ``optax.masked`` and
    ``optax.multi_transform`` too (its state, :class:`ScaleByMupState`, records the multipliers of its last
    update, for the tuners: a transform rebuilt with new multipliers around the old state, to unfreeze a part or
    change a layer-wise decay mid-run, writes its own at its first update; before, the state kept the first
    ones and CDAT's numerator and noise metric read them for the rest of the run, rates up to 2.9x PyTorch's in
    a field test).

    Put it between the base direction and the learning rate / tuner:
    ``cdat(optax.chain(optax.scale_by_adam(), scale_by_mup(mup.lr_mults)), base_method="adam")`` (the
    convenience hands Adam's state to the tuner; a bare ``optax.chain(..., scale_by_cdat(...))`` does not, so
    the tuner warns and falls back to the paper's numerator).
    """

    def init_fn(params):  # the multipliers in the tuners' accumulator dtype (float64 ones under x64: 0.3 exactly)
        floats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
        dtype = accumulator_dtype(floats) if floats else jnp.float32
        return ScaleByMupState(jax.tree.map(lambda m: jnp.asarray(m, dtype), _pure(lr_mults)))

    def update_fn(updates, state, params=None):
        del params
        mults = ScaleByMupState(jax.tree.map(lambda m, kept: jnp.asarray(m, kept.dtype), _pure(lr_mults),
                                             state.lr_mults))
        return jax.tree_util.tree_map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype),
                                      updates, like_params(lr_mults, updates)), mults

    return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights_mup(weight_decay: float, wd_mults: Any) -> optax.GradientTransformation:
    """``optax.add_decayed_weights`` with a per-leaf factor ``weight_decay * wd_mult`` (1-d leaves too).

    Place it before :func:`scale_by_mup` so that the per-step decay ``lr * lr_mult * wd * wd_mult`` does not
    change with width (as ``mup.MuAdamW`` with lr-coupled decay).
    """
    check_nonnegative("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights_mup needs params in update(updates, state, params)")
        return jax.tree_util.tree_map(lambda u, p, m: u + (weight_decay * m) * p, updates, params,
                                      like_params(wd_mults, updates)), state

    return optax.GradientTransformation(init_fn, update_fn)


class MuP(NamedTuple):
    """What :func:`parameterize` returns. Trees have the structure of ``params`` with Python floats."""

    table: dict
    lr_mults: Any
    wd_mults: Any
    forward_mults: Any
    transform: optax.GradientTransformation
    branch_multiplier: float
    attention: str
    treedef: Any

    def init(self, key: jax.Array, params: Any) -> Any:
        """Re-initialise: ≥ 2-d leaves from ``N(0, init_std²)`` of the table, other leaves unchanged."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        if treedef != self.treedef:
            raise ValueError("params do not have the structure given to parameterize")
        keys = jax.random.split(key, max(len(leaves), 1))
        out = []
        for k, (path, leaf) in zip(keys, leaves):
            std = self.table[_name(path)].init_std
            out.append(leaf if std is None else (std * jax.random.normal(k, leaf.shape, leaf.dtype)))
        return jax.tree_util.tree_unflatten(treedef, out)

    def apply_multipliers(self, params: Any) -> Any:
        """Effective parameters ``forward_mult * p`` (call inside the loss, before ``model.apply``)."""
        return jax.tree_util.tree_map(lambda p, m: p if m == 1.0 else p * jnp.asarray(m, p.dtype),
                                      params, self.forward_mults)

    def decay(self, weight_decay: float) -> optax.GradientTransformation:
        """:func:`add_decayed_weights_mup` with this table's weight-decay multipliers."""
        return add_decayed_weights_mup(weight_decay, self.wd_mults)

    def attention_scale(self, head_dim: int, base_head_dim: int | None = None) -> float:
        """Attention-logit scale (μP: ``1/d`` form normalised at the base head dim, else ``1/sqrt(d)``)."""
        return core.attention_scale(head_dim, base_head_dim, self.attention)


def parameterize(
    params: Any,
    base_params: Any,
    *,
    optimizer: str = "adam",
    parameterization: str = "mup",
    gamma: float = 1.0,
    depth: int | None = None,
    overrides: Mapping[str, str] | None = None,
    residual_branches: Sequence[str] | None = None,
    attention: str | None = None,
    layouts: Mapping[str, str] | None = None,
    init_sigma: float = 1.0, zero_readout: bool = False, delta_params: Any = None,
    gamma_depth: int | None = None,
    stacked: Mapping[str, int] | None = None,
) -> MuP:
    """μP (or SP/NTK) for the model whose parameters are ``params`` relative to ``base_params``.

    Both are pytrees of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape(model.init, ...)``) with the
    same paths. ``residual_branches``: globs over leaf names of the parameters inside residual branches
    (they get depth-μP's Adam learning-rate correction; scale the branch outputs by
    ``branch_multiplier`` in the model). ``delta_params``: a third tree of another width (roles from
    ``base_params`` vs ``delta_params``). ``stacked``: ``{glob: k}`` for leaves whose first ``k`` axes stack
    layers (``nn.scan``, ``nnx.vmap``/``nnx.scan`` over layers: a ``[L, in, out]`` kernel); those axes are
    neither fan-in nor width, each layer is initialised and scaled as one unstacked tensor, and the stack
    counts ``L`` times in the γ rule's ``L`` (the model and the base may differ in ``L``). Without it the stack
    axis is read as part of the fan-in: the multipliers are wrong and nothing can tell. Other arguments as
    the PyTorch ``parameterize``.
    """
    table = mup_table(params, base_params, optimizer=optimizer, parameterization=parameterization, gamma=gamma,
                      depth=depth, overrides=overrides, residual_branches=residual_branches, layouts=layouts,
                      init_sigma=init_sigma, zero_readout=zero_readout, delta_params=delta_params,
                      gamma_depth=gamma_depth, stacked=stacked)
    for message in core.readout_messages(table, parameterization, overrides):
        warn(message)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_name(p) for p, _ in leaves]

    def tree(attr: str) -> Any:
        return jax.tree_util.tree_unflatten(treedef, [float(getattr(table[n], attr)) for n in names])

    attention = core.resolve_attention(attention, parameterization)
    if attention == "1/d" and any(s.layout == "in_heads" for s in table.values()):
        warn("curvopt.mup: flax's MultiHeadDotProductAttention (query/key/value kernels [in, heads, "
             "head_dim]) scales its logits by 1/sqrt(head_dim) unless given an attention_fn, so μP's 1/d "
             "attention applies only through one: scale the query by mup.attention_scale(head_dim, "
             "base_head_dim) * sqrt(head_dim) in it, or pass attention='1/sqrt(d)' to record what the model "
             "does.")
    lr_mults = tree("lr_mult")
    return MuP(table=table, lr_mults=lr_mults, wd_mults=tree("wd_mult"), forward_mults=tree("forward_mult"),
               transform=scale_by_mup(lr_mults), branch_multiplier=core.depth_multiplier(depth),
               attention=attention, treedef=treedef)
