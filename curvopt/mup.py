"""μP, depth-μP and the feature-learning strength γ: the tables, written once for both backends.

Numbers and shape logic only (no torch, no jax). The backends turn a model into ``{name: (shape, layout)}``
for the target and the base model, call :func:`build_table`, and apply the resulting :class:`ParamScaling`
entries (re-initialisation, forward multipliers, per-parameter learning-rate and weight-decay multipliers).

Form of the table
-----------------
We use the *multiplier* form of μP (Tensor Programs V, Yang et al. 2022, arXiv 2203.03466, Table 8, as in
Microsoft's ``mup`` package): every quantity is written relative to a *base* (narrow) model, with width
multipliers ``m_in = fan_in / base_fan_in`` and ``m_out = fan_out / base_fan_out``. At the base shape every
parameterisation coincides with the standard one, so hyperparameters tuned on the base model carry over.

Roles (inferred by :func:`infer_role` from which dimensions differ between the target and the base):

========  =====================================  ===========================================================
role      which dims are width dims              examples
========  =====================================  ===========================================================
input     fan_out only                           first layer, embeddings, all biases, LayerNorm gains
hidden    fan_in and fan_out                     hidden-to-hidden weights, attention / MLP projections
output    fan_in only                            readout / unembedding
finite    none                                   weights and biases that do not grow with width
========  =====================================  ===========================================================

Table (``σ`` = ``init_sigma``; ``init std`` is the std of the *stored* tensor; the effective weight is
``forward_mult * stored``; ``lr`` multiplies the global learning rate; ``wd = 1 / lr``, see below):

=====================  ==============  ============  ===============  ================  =============
parameterisation/role  init std        forward mult  lr (Adam-like)   lr (SGD-like)     note
=====================  ==============  ============  ===============  ================  =============
mup    input           σ/√fan_in       1             1                m_out             TP5 Table 3
mup    hidden          σ/√fan_in       1             1/m_in           m_out/m_in
mup    output          σ/√base_fan_in  1/m_in        1                m_in              effective init
                                                                                        var σ²/(base_fan_in m_in²)
sp     any             σ/√fan_in       1             1                1
ntk    input/finite    σ/√fan_in       1             1                1
ntk    hidden/output   σ/√base_fan_in  1/√m_in       1                1                 effective init = SP
=====================  ==============  ============  ===============  ================  =============

In the effective (non-multiplier) weights this is exactly TP5 Table 3: output init variance
``∝ 1/fan_in²``; Adam learning rate 1 (input), ``1/fan_in`` (hidden), ``1/fan_in`` (output, through the
forward multiplier); SGD ``fan_out`` (input), 1 (hidden, square growth), ``1/fan_in`` (output).
Vector-like parameters (1-D: biases, norm gains) keep their module's own initialisation (``init_std`` is
``None``); they are input-like for the learning rate.

Weight decay: ``wd_mult = 1 / (width and depth part of lr_mult)``, as ``mup.MuAdam``/``MuSGD`` do for
lr-coupled decay (``torch.optim.SGD``/``AdamW``, ``optax.add_decayed_weights`` before the learning rate):
the decay per step ``lr * wd`` then does not change with width. The γ scale is not compensated.

Depth-μP
--------
Residual branches are multiplied by ``1/sqrt(L)`` (``L`` residual blocks) and, for Adam-like optimizers,
the learning rate of the parameters inside the branches by ``1/sqrt(L)`` as well; SGD-like optimizers keep
it. This is the block-depth-1 "Depth-μP" of Tensor Programs VI (Yang, Yu, Zhu, Hayou 2023, arXiv 2310.02244,
Table 1: branch multiplier ``a/√L``, learning rate ``η`` for SGD and ``η/√L`` for Adam); Bordelon et al. 2023
(arXiv 2309.16620) use the same ``1/√L`` branch scaling.

Feature-learning strength γ
---------------------------
On top of μP the output is multiplied by ``1/γ`` (``γ = 1``: plain μP; small γ: lazy / kernel-like; large γ:
ultra-rich). The optimal SGD learning rate then scales as ``γ²`` for ``γ ≤ 1`` and ``γ^(2/L)`` for ``γ > 1``
(Atanasov, Meterez, Simon, Pehlevan 2024, arXiv 2410.04642), with ``L`` the depth (number of
layers). For Adam-like optimizers the update size does not depend on the gradient's scale, so the ``1/γ`` in
the gradient cancels and only the ``1/γ`` of the forward pass remains: we use ``γ`` (``γ ≤ 1``) and
``γ^(1/L)`` (``γ > 1``), the square root of the SGD rule. This Adam variant is our derivation by that
argument, not a published measurement.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .validation import check_choice, check_positive, check_positive_int

__all__ = [
    "ROLES",
    "OPTIMIZERS",
    "PARAMETERIZATIONS",
    "LAYOUTS",
    "ATTENTION_SCALINGS",
    "RoleScaling",
    "ParamScaling",
    "fans",
    "width_mults",
    "infer_role",
    "role_scaling",
    "depth_multiplier",
    "depth_lr_mult",
    "gamma_output_multiplier",
    "gamma_lr_scale",
    "attention_scale",
    "optimizer_family",
    "match_names",
    "with_layouts",
    "check_same_names",
    "build_table",
    "missing_readout_message",
    "table_numbers",
    "readout_messages",
    "suspect_readout_message",
    "resolve_attention",
]

ROLES = ("input", "hidden", "output", "finite")
OPTIMIZERS = ("adam", "sgd")
PARAMETERIZATIONS = ("mup", "sp", "ntk")
#: How a tensor's axes map to fan-in / fan-out.
#: ``out_in``: PyTorch Linear/Conv ``[out, in, *kernel]``; ``in_out``: Flax/JAX ``[*kernel, in, out]``;
#: ``in_heads``: Flax ``DenseGeneral`` onto several output axes ``[in, *out]`` (attention's query/key/value
#: kernels ``[in, heads, head_dim]``); ``embedding``: ``[vocab, dim]`` (fan-in = vocab for roles, one-hot input
#: so init std = σ); ``vector``: a bias or norm gain of any shape (Flax attention's biases are
#: ``[heads, head_dim]``): every axis fan-out, fan-in = 1, never re-initialised.
LAYOUTS = ("out_in", "in_out", "in_heads", "embedding", "vector")
ATTENTION_SCALINGS = ("1/d", "1/sqrt(d)")

# Names users pass for the optimizer family; anything Adam-like (per-coordinate normalised updates) vs SGD-like.
_FAMILIES = {
    "adam": "adam", "adamw": "adam", "adamax": "adam", "rmsprop": "adam", "adagrad": "adam", "lion": "adam",
    "sgd": "sgd", "momentum": "sgd", "heavy_ball": "sgd", "nesterov": "sgd", "gd": "sgd",
}


def optimizer_family(optimizer: str) -> str:
    """``"adam"`` or ``"sgd"`` from an optimizer name (``"adamw"``, ``"momentum"``, ... are accepted)."""
    key = str(optimizer).lower() if isinstance(optimizer, str) else optimizer
    if key not in _FAMILIES:
        raise ValueError(f"optimizer must be one of {tuple(_FAMILIES)} (Adam-like or SGD-like), got {optimizer!r}")
    return _FAMILIES[key]


@dataclass(frozen=True)
class RoleScaling:
    """One cell of the table, relative to the standard parameterisation at the base shape."""

    init_mult: float  # multiplies the standard init std σ/sqrt(fan_in)
    forward_mult: float
    lr_mult: float  # width part only
    wd_mult: float


@dataclass(frozen=True)
class ParamScaling:
    """Everything a backend needs for one parameter (one row of :func:`build_table`)."""

    name: str
    role: str
    shape: tuple
    base_shape: tuple
    layout: str
    fan_in: int
    fan_out: int
    width_mult_in: float
    width_mult_out: float
    init_std: float | None  # std of the stored tensor for a fresh N(0, std²) init; None: keep the module's
    forward_mult: float  # effective tensor = forward_mult * stored tensor
    lr_mult: float  # relative learning rate (width x depth x γ parts)
    wd_mult: float  # relative weight decay
    residual_branch: bool = False


def _check_layout(layout: str, shape: Sequence[int]) -> None:
    check_choice("layout", layout, LAYOUTS)
    nd = len(shape)
    if layout in ("out_in", "in_out", "in_heads", "embedding") and nd < 2:
        raise ValueError(f"layout {layout!r} needs at least 2 dims, got shape {tuple(shape)}")
    if layout == "embedding" and nd != 2:
        raise ValueError(f"layout 'embedding' needs a 2-d [vocab, dim] shape, got {tuple(shape)}")


def _axes(shape: Sequence[int], layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(fan_in axes, fan_out axes); the kernel (receptive-field) axes count in the fan-in."""
    nd = len(shape)
    if layout == "vector":
        return (), tuple(range(nd))
    if layout == "out_in":
        return tuple(range(1, nd)), (0,)
    if layout == "in_out":
        return tuple(range(0, nd - 1)), (nd - 1,)
    if layout == "in_heads":
        return (0,), tuple(range(1, nd))
    return (0,), (1,)  # embedding


def fans(shape: Sequence[int], layout: str) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a tensor of ``shape`` in ``layout`` (receptive field counted in fan-in)."""
    _check_layout(layout, shape)
    ax_in, ax_out = _axes(shape, layout)
    return math.prod(shape[a] for a in ax_in), math.prod(shape[a] for a in ax_out)


def width_mults(shape: Sequence[int], base_shape: Sequence[int], layout: str) -> tuple[float, float]:
    """``(m_in, m_out) = (fan_in / base_fan_in, fan_out / base_fan_out)``."""
    fi, fo = fans(shape, layout)
    bfi, bfo = fans(base_shape, layout)
    return fi / bfi, fo / bfo


def infer_role(shape: Sequence[int], base_shape: Sequence[int], layout: str) -> str:
    """Role from the dimensions that differ between the target and the base (as ``mup.set_base_shapes``).

    No differing dim: ``"finite"``; only fan-out dims differ: ``"input"``; only fan-in dims: ``"output"``;
    both: ``"hidden"``. Vectors (biases, gains) are fan-out only, so they are ``"input"`` when they grow.
    """
    shape, base_shape = tuple(int(s) for s in shape), tuple(int(s) for s in base_shape)
    if len(shape) != len(base_shape):
        raise ValueError(f"shape {shape} and base shape {base_shape} have different numbers of dims")
    if any(s <= 0 for s in shape + base_shape):
        raise ValueError(f"shapes must be positive, got {shape} and base {base_shape}")
    _check_layout(layout, shape)
    ax_in, ax_out = _axes(shape, layout)
    grows_in = any(shape[a] != base_shape[a] for a in ax_in)
    grows_out = any(shape[a] != base_shape[a] for a in ax_out)
    if grows_in and grows_out:
        return "hidden"
    if grows_in:
        return "output"
    if grows_out:
        return "input"
    return "finite"


def role_scaling(role: str, m_in: float, m_out: float, *, optimizer: str, parameterization: str) -> RoleScaling:
    """The table cell (see the module docstring) for a role and width multipliers."""
    check_choice("role", role, ROLES)
    family = optimizer_family(optimizer)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_positive("m_in", m_in)
    check_positive("m_out", m_out)
    init, fwd, lr = 1.0, 1.0, 1.0
    if parameterization == "mup":
        if role == "input":
            lr = 1.0 if family == "adam" else m_out
        elif role == "hidden":
            lr = 1.0 / m_in if family == "adam" else m_out / m_in
        elif role == "output":  # stored std σ/√base_fan_in, as mup's MuReadout rescales it (× √m_in)
            init, fwd = math.sqrt(m_in), 1.0 / m_in
            lr = 1.0 if family == "adam" else m_in
    elif parameterization == "ntk":
        if role in ("hidden", "output"):
            init, fwd = math.sqrt(m_in), 1.0 / math.sqrt(m_in)
    return RoleScaling(init_mult=init, forward_mult=fwd, lr_mult=lr, wd_mult=1.0 / lr)


def depth_multiplier(depth: int | None) -> float:
    """Residual-branch multiplier ``1/sqrt(L)`` of depth-μP (1 when ``depth`` is None)."""
    if depth is None:
        return 1.0
    return 1.0 / math.sqrt(check_positive_int("depth", depth))


def depth_lr_mult(depth: int | None, optimizer: str) -> float:
    """Learning-rate correction of parameters inside residual branches: ``1/sqrt(L)`` for Adam, 1 for SGD."""
    if depth is None or optimizer_family(optimizer) == "sgd":
        return 1.0
    return 1.0 / math.sqrt(check_positive_int("depth", depth))


def gamma_output_multiplier(gamma: float) -> float:
    """Output multiplier ``1/γ``."""
    return 1.0 / check_positive("gamma", gamma)


def gamma_lr_scale(gamma: float, optimizer: str, depth: int | None = None) -> float:
    """Global learning-rate scale for feature-learning strength γ.

    SGD: ``γ²`` (γ ≤ 1), ``γ^(2/L)`` (γ > 1). Adam: ``γ`` (γ ≤ 1), ``γ^(1/L)`` (γ > 1). ``depth`` (``L``)
    is needed only for γ > 1.
    """
    g = check_positive("gamma", gamma)
    power = 2.0 if optimizer_family(optimizer) == "sgd" else 1.0
    if g <= 1.0:
        return g**power
    if depth is None:
        raise ValueError("gamma > 1 needs the network depth L (the learning-rate scale is gamma**(2/L))")
    return g ** (power / check_positive_int("depth", depth))


def attention_scale(head_dim: int, base_head_dim: int | None = None, scaling: str = "1/d") -> float:
    """Attention-logit scale.

    ``"1/sqrt(d)"``: the standard ``1/sqrt(head_dim)``. ``"1/d"`` (μP, TP5 §4): ``sqrt(base_d)/head_dim``,
    i.e. ``1/d`` normalised to equal ``1/sqrt(d)`` at the base head dim (``base_head_dim`` defaults to
    ``head_dim``, which gives ``1/sqrt(d)``).
    """
    d = check_positive_int("head_dim", head_dim)
    check_choice("scaling", scaling, ATTENTION_SCALINGS)
    if scaling == "1/sqrt(d)":
        return 1.0 / math.sqrt(d)
    b = d if base_head_dim is None else check_positive_int("base_head_dim", base_head_dim)
    return math.sqrt(b) / d


def match_names(patterns: Iterable[str], names: Iterable[str], what: str) -> dict[str, list[str]]:
    """``{pattern: [names matching it]}`` with ``fnmatch`` globs; a pattern that matches nothing raises."""
    names = list(names)
    out = {}
    for pat in patterns:
        hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"{what} pattern {pat!r} matches no parameter; names are e.g. {names[:6]}")
        out[pat] = hits
    return out


def with_layouts(layouts: Mapping[str, str], chosen: Mapping[str, str] | None) -> dict[str, str]:
    """The backend's default ``{name: layout}`` with the user's ``chosen={name or glob: layout}`` applied (a
    glob that matches no parameter is refused)."""
    out = dict(layouts)
    for pat, hits in match_names((chosen or {}).keys(), out, "layouts").items():
        check_choice(f"layouts[{pat!r}]", chosen[pat], LAYOUTS)
        for h in hits:
            out[h] = chosen[pat]
    return out


def check_same_names(target: Iterable[str], base: Iterable[str]) -> None:
    """Raise ValueError listing the names only one of the two models has."""
    t, b = list(target), list(base)
    missing, extra = sorted(set(t) - set(b)), sorted(set(b) - set(t))
    if missing or extra:
        raise ValueError(
            "the model and the base model must have the same parameter names; "
            f"only in the model: {missing[:8]}, only in the base model: {extra[:8]}"
        )


def build_table(
    shapes: Mapping[str, tuple[Sequence[int], str]],
    base_shapes: Mapping[str, Sequence[int]],
    *,
    optimizer: str = "adam",
    parameterization: str = "mup",
    gamma: float = 1.0,
    depth: int | None = None,
    residual_branch: Iterable[str] = (),
    overrides: Mapping[str, str] | None = None,
    init_sigma: float = 1.0,
    gamma_depth: int | None = None,
    zero_readout: bool = False,
    delta_shapes: Mapping[str, Sequence[int]] | None = None,
    tensor_counts: Mapping[str, int] | None = None,
) -> dict[str, ParamScaling]:
    """The table for a whole model.

    ``shapes``: ``{name: (shape, layout)}`` of the target model; ``base_shapes``: ``{name: shape}`` of the
    base model (same names). ``residual_branch``: names of the parameters inside residual branches (they get
    the depth-μP learning-rate correction when ``depth`` is given). ``overrides``: ``{name or glob: role}``
    (a role in :data:`ROLES`, or ``"embedding"`` = input role with a one-hot input, init std σ).
    ``gamma_depth``: the ``L`` of the γ > 1 rule (defaults to ``depth``, then to the number of parameters
    with at least 2 dims, i.e. the number of weight tensors: a packed or fused projection, such as
    ``nn.MultiheadAttention``'s ``in_proj_weight`` for q, k and v, counts once, separate ones three times, so
    pass ``gamma_depth`` for an ``L`` that does not depend on how the model is written). ``zero_readout``:
    output-role weights start at zero (TP5's recommended "zero readout" initialisation,
    ``mup.MuReadout(readout_zero_init=True)``).
    ``delta_shapes``: shapes of a third model of another width (``mup``'s ``delta``); when given, roles are
    inferred from ``base_shapes`` vs ``delta_shapes`` and only the multipliers from the target, so that a
    target as wide as the base still knows its readout (for γ and ``zero_readout``).
    ``tensor_counts``: ``{name: n}`` for a parameter that stores ``n`` layers' tensors stacked (a scanned
    layer; ``shapes`` then gives one layer's shape): it counts ``n`` times in the γ rule's ``L``.
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    family = optimizer_family(optimizer)
    check_positive("gamma", gamma)
    check_positive("init_sigma", init_sigma)
    if depth is not None:
        check_positive_int("depth", depth)
    check_same_names(shapes, base_shapes)
    if delta_shapes is not None:
        check_same_names(shapes, delta_shapes)
    residual = set(residual_branch)
    unknown = residual - set(shapes)
    if unknown:
        raise ValueError(f"residual_branch names are not parameters: {sorted(unknown)[:8]}")
    if depth is not None and not residual:
        raise ValueError("depth is given but no parameter is in a residual branch (pass residual_branches)")
    role_over: dict[str, str] = {}
    for pat, names in match_names((overrides or {}).keys(), shapes, "overrides").items():
        role = overrides[pat]
        check_choice(f"overrides[{pat!r}]", role, ROLES + ("embedding",))
        for n in names:
            role_over[n] = role
    if gamma_depth is None:
        counts = tensor_counts or {}
        layers = sum(counts.get(n, 1) for n, (s, lay) in shapes.items() if len(s) >= 2 and lay != "vector")
        gamma_depth = depth if depth is not None else max(1, layers)
    g_lr = gamma_lr_scale(gamma, family, gamma_depth)
    g_out = gamma_output_multiplier(gamma)
    d_lr = depth_lr_mult(depth, family)

    table = {}
    for name, (shape, layout) in shapes.items():
        shape = tuple(int(s) for s in shape)
        base = tuple(int(s) for s in base_shapes[name])
        if len(shape) == 0:
            layout = "vector"
        role = role_over.get(name)
        if role == "embedding":
            if len(shape) != 2:
                raise ValueError(f"override 'embedding' for {name!r} needs a 2-d shape, got {shape}")
            layout, role = "embedding", None
        if role is None:
            try:
                role = infer_role(shape if delta_shapes is None else delta_shapes[name], base, layout)
            except ValueError as e:
                raise ValueError(f"parameter {name!r}: {e}") from None
        m_in, m_out = width_mults(shape, base, layout)
        cell = role_scaling(role, m_in, m_out, optimizer=family, parameterization=parameterization)
        fi, fo = fans(shape, layout)
        if len(shape) < 2 or layout == "vector":
            init_std = None
        elif layout == "embedding":
            init_std = init_sigma * cell.init_mult
        else:
            init_std = init_sigma * cell.init_mult / math.sqrt(fi)
        if zero_readout and role == "output" and init_std is not None:
            init_std = 0.0
        fwd = cell.forward_mult * (g_out if role == "output" else 1.0)
        in_branch = depth is not None and name in residual
        width_depth_lr = cell.lr_mult * (d_lr if in_branch else 1.0)
        table[name] = ParamScaling(
            name=name, role=role, shape=shape, base_shape=base, layout=layout, fan_in=fi, fan_out=fo,
            width_mult_in=m_in, width_mult_out=m_out, init_std=init_std, forward_mult=fwd,
            lr_mult=width_depth_lr * g_lr, wd_mult=1.0 / width_depth_lr, residual_branch=in_branch,
        )
    if (gamma != 1.0 or zero_readout) and not any(s.role == "output" for s in table.values()):
        what = (f"gamma={gamma:g} multiplies the readout by 1/gamma" if gamma != 1.0
                else "zero_readout=True zeroes the readout's initial weights")
        raise ValueError(
            f"{what}, but no parameter has the output role, so it would not apply: a target as wide as the base "
            "(every width multiplier 1) needs delta_model/delta_params, a model of a third width, to tell its "
            "readout; a readout through a tied embedding (h @ emb.weight.T, flax Embed.attend) is not a parameter "
            "of its own: untie it into a Linear/Dense readout, or apply the readout's multipliers in your forward "
            "pass from mup_table")
    return table


def readout_messages(table: Mapping[str, ParamScaling], parameterization: str,
                     overrides: Mapping[str, str] | None = None) -> list[str]:
    """The warnings a backend gives about a table's readouts: none found (:func:`missing_readout_message`), or
    readouts that look misread (:func:`suspect_readout_message`)."""
    return [m for m in (missing_readout_message(table, parameterization), suspect_readout_message(table, overrides))
            if m is not None]


def suspect_readout_message(table: Mapping[str, ParamScaling], overrides: Mapping[str, str] | None = None
                            ) -> str | None:
    """The warning for readouts inferred in layout ``in_out`` (``[*kernel, in, out]``) through a kernel axis that
    grows with the width, beside a readout that is not (two such heads, ``DenseGeneral(axis=(-2, -1))`` readouts
    of ``[heads, head_dim, out]``, are read right and not warned): how a kernel onto several output axes reads (flax's
    ``DenseGeneral(features=(3, heads, head_dim))`` named other than query/key/value: ``[in, 3, heads, head_dim]``,
    whose ``in`` and ``heads`` are then fan-in; a field test's fused q/k/v got a 1/16 forward multiplier inside
    the network, silently), and a stack of layers without ``stacked=``. None otherwise, and for the readouts
    ``overrides`` names."""
    named = {n for hits in match_names((overrides or {}).keys(), table, "overrides").values() for n in hits}
    readouts = [s for s in table.values() if s.role == "output"]
    suspect = [s.name for s in readouts if s.name not in named and s.layout == "in_out" and len(s.shape) >= 3
               and any(a != b for a, b in zip(s.shape[:-2], s.base_shape[:-2]))]
    if not suspect or len(suspect) == len(readouts):  # beside a readout read plainly
        return None
    return (f"curvopt.mup: {suspect} read as readouts (forward multiplier 1/m) through a leading axis that grows with "
            "the width, which layout 'in_out' ([*kernel, in, out]) counts as a receptive field, beside another "
            "readout. A kernel onto several output axes ([in, *out]: a DenseGeneral with features=(3, heads, "
            "head_dim)) needs layouts={name: 'in_heads'}; layers stacked by nn.scan need stacked={name: 1}; a "
            "readout indeed: overrides={name: 'output'}.")


def missing_readout_message(table: Mapping[str, ParamScaling], parameterization: str) -> str | None:
    """The warning for a μP table of a model wider than its base (a parameter has the hidden role) in which no
    parameter has the output role, so that μP's readout rule (forward ``1/m``) applies to none; None otherwise. A
    readout whose class count or vocabulary differs from the base's, or a last ``Linear(width, width)``, is read as
    hidden; ``build_table`` raises where the readout is needed for ``gamma`` or ``zero_readout``."""
    roles = {s.role for s in table.values()}
    if parameterization != "mup" or "output" in roles or "hidden" not in roles:
        return None
    return ("curvopt.mup: no parameter has the output role, so μP's readout multiplier 1/m applies to none, while the "
            "model is wider than its base. A readout is a weight whose fan-in grows with the width and whose fan-out "
            "does not: a last layer of the model's width (Linear(width, width)), a class count or vocabulary that "
            "differs between the model and its base, or a readout through a tied embedding is not read as one. Name "
            "it with overrides={name: 'output'}; a model without a readout (its output grows with the width) has "
            "none to name.")


def table_numbers(table: Mapping[str, ParamScaling]) -> dict[str, dict]:
    """``{name: {"role", "init_std", "forward_mult", "lr_mult", "wd_mult"}}`` (for tests and logging)."""
    keys = ("role", "init_std", "forward_mult", "lr_mult", "wd_mult")
    return {n: {k: getattr(s, k) for k in keys} for n, s in table.items()}


def resolve_attention(attention: str | None, parameterization: str) -> str:
    """The attention scaling flag: ``attention`` if given, else ``"1/d"`` under μP and ``"1/sqrt(d)"`` otherwise."""
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if attention is None:
        return "1/d" if parameterization == "mup" else "1/sqrt(d)"
    return check_choice("attention", attention, ATTENTION_SCALINGS)
