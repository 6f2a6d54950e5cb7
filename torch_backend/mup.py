"""μP / depth-μP / γ for PyTorch models: re-initialisation, forward multipliers and param groups.

The numbers come from :mod:`curvopt.mup` (one table for both backends); this module only reads a model's
parameter shapes, applies the table and builds ``torch.optim`` param groups.

Forward multipliers are applied with **module hooks**, never by changing the stored tensors or their names:

* a weight with multiplier ``c`` in an ``nn.Linear`` / ``nn.ConvNd`` / ``nn.Bilinear``-free linear layer: a
  forward *pre*-hook multiplies the layer's input by ``c`` (``W (c x) + b = (c W) x + b``: the weight is
  scaled, the bias is not), as ``mup.MuReadout`` does;
* an ``nn.Embedding`` weight with multiplier ``c``: a forward hook multiplies its output by ``c``;
* residual branches (depth-μP): a forward hook multiplies the branch module's output by ``1/sqrt(L)``.

Hooks hold no state of their own (small picklable callables), so ``state_dict`` keys and values are those of
the plain model, ``copy.deepcopy`` and ``torch.save(model)`` keep them, and ``torch.func.functional_call`` runs
them (it calls the module). A ``state_dict`` does not carry them: loaded into a fresh model, the model needs
``parameterize(model, base_model, reinit=False)`` (the hooks, not a redraw of the loaded weights) to compute the
same function. Calling :func:`parameterize` again replaces the hooks of the previous call, also those a call on
a containing model installed.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.parametrize import ParametrizationList
from torch.nn.utils.weight_norm import WeightNorm

from curvopt import mup as core
from curvopt.validation import check_nonnegative, check_positive

from .warning import warn

__all__ = ["parameterize", "mup_table", "mup_multipliers", "remove_parameterization", "MuPParamGroups"]

_HANDLES_ATTR = "_curvopt_mup_handles"
_TABLE_ATTR = "_curvopt_mup_table"
_LINEAR_IN_INPUT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _ScaleInput:
    """Forward pre-hook (``with_kwargs=True``): multiply the input (the first positional argument, or the
    ``input=`` keyword of ``nn.Linear``/``nn.ConvNd``) by a constant."""

    def __init__(self, mult: float):
        self.mult = float(mult)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0] * self.mult,) + tuple(args[1:]), kwargs
        if "input" in kwargs:
            return args, {**kwargs, "input": kwargs["input"] * self.mult}
        raise TypeError(f"curvopt.mup: {type(module).__name__} called without its input (positional or input=)")

    def __repr__(self) -> str:
        return f"ScaleInput({self.mult:g})"


class _ScaleOutput:
    """Forward hook: multiply the module's (tensor) output by a constant; of an ``nn.MultiheadAttention``, the
    attention output (the first of its ``(output, weights)``)."""

    def __init__(self, mult: float):
        self.mult = float(mult)

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(module, nn.MultiheadAttention) and isinstance(output, tuple):
            return (output[0] * self.mult,) + tuple(output[1:])
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"curvopt.mup: cannot scale the output of {type(module).__name__} (a {type(output).__name__}); "
                "residual branches and scaled embeddings must return a single tensor"
            )
        return output * self.mult

    def __repr__(self) -> str:
        return f"ScaleOutput({self.mult:g})"


class MuPParamGroups(list):
    """A list of ``torch.optim`` param groups that also carries the table (``.table``: name -> ParamScaling),
    the residual-branch multiplier (``.branch_multiplier``) and the attention scaling (``.attention``)."""

    table: dict
    branch_multiplier: float
    attention: str

    def attention_scale(self, head_dim: int, base_head_dim: int | None = None) -> float:
        """Attention-logit scale for this parameterisation (μP: ``1/d`` form, else ``1/sqrt(d)``)."""
        return core.attention_scale(head_dim, base_head_dim, self.attention)


#: norm layers (``_NormBase``: BatchNorm, InstanceNorm); RMSNorm from torch 2.4
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase) + tuple(
    getattr(nn, name) for name in ("RMSNorm",) if hasattr(nn, name))


def _weight_norm_gain(module: nn.Module, pname: str) -> bool:
    """Is ``pname`` the magnitude ``g`` of a weight-normalised weight (``[out, 1, ...]``, ``w = g v / |v|``):
    ``parametrizations.weight_norm``'s ``original0``, or the deprecated ``weight_norm``'s ``<name>_g``?"""
    if isinstance(module, ParametrizationList):
        return pname == "original0" and isinstance(module[0], _WeightNorm)
    return any(isinstance(h, WeightNorm) and pname == f"{h.name}_g"
               for h in module._forward_pre_hooks.values())


def _layout(module: nn.Module, pname: str, p: torch.Tensor) -> str:
    """A tensor's layout (:data:`curvopt.mup.LAYOUTS`) from its module: a 0-d/1-d tensor, a norm layer's gain and
    bias (``nn.LayerNorm((d, c))``'s are 2-d) and a weight norm's magnitude are vectors, as in Flax."""
    norm = isinstance(module, _NORMS) and pname in ("weight", "bias")
    if p.ndim <= 1 or norm or _weight_norm_gain(module, pname):
        return "vector"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and pname == "weight":
        return "embedding"
    if isinstance(module, nn.MultiheadAttention) and pname in ("bias_k", "bias_v"):
        return "vector"  # add_bias_kv's [1, 1, d]: a key/value row appended to the sequence, not an [out, in] weight
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        raise ValueError("curvopt.mup: ConvTranspose layers are not supported (their weight is [in, out, *k])")
    return "out_in"  # nn.Linear / ConvNd / MultiheadAttention in_proj and any other [out, in, ...] weight


def _views(model: nn.Module) -> tuple[dict[str, tuple], dict[str, list[str]]]:
    """``{view name: (module name, module, param name, tensor)}`` for every (module, direct parameter) pair,
    and ``{canonical name: [view names]}`` (tied parameters have several views; the canonical name is the one
    ``model.named_parameters()`` reports)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    views: dict[str, tuple] = {}
    aliases: dict[str, list[str]] = {n: [] for n in canonical.values()}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            vname = f"{mname}.{pname}" if mname else pname
            if vname in views or id(p) not in canonical:
                continue
            views[vname] = (mname, mod, pname, p)
            aliases[canonical[id(p)]].append(vname)
    for n, vs in aliases.items():  # put the canonical view first
        vs.sort(key=lambda v: v != n)
    return views, aliases


def _build(
    model: nn.Module,
    base_model: nn.Module,
    *,
    optimizer: str,
    parameterization: str,
    gamma: float,
    depth: int | None,
    overrides: Mapping[str, str] | None,
    residual_branches: Sequence[str] | None,
    init_sigma: float,
    attention: str | None,
    zero_readout: bool = False,
    delta_model: nn.Module | None = None,
    layouts: Mapping[str, str] | None = None,
    gamma_depth: int | None = None,
):
    if not isinstance(model, nn.Module) or not isinstance(base_model, nn.Module):
        raise ValueError("model and base_model must be torch.nn.Module instances")
    views, aliases = _views(model)
    base_views, _ = _views(base_model)
    core.check_same_names(views, base_views)
    branch_modules: list[str] = []
    by_name: dict[str, nn.Module] = {}
    if residual_branches:
        by_name = {n: m for n, m in model.named_modules(remove_duplicate=False) if n}  # a shared block: every name
        for pat, hits in core.match_names(residual_branches, list(by_name), "residual_branches").items():
            branch_modules += [h for h in hits if h not in branch_modules]
        # a glob also matches inside a branch ("blocks.*" matches "blocks.0.attn"): the outermost match is the branch
        branch_modules = [b for b in branch_modules if not any(b.startswith(o + ".") for o in branch_modules)]
        for b in branch_modules:
            if isinstance(by_name[b], (nn.ModuleList, nn.ModuleDict)):
                raise ValueError(
                    f"residual_branches matches {b!r}, a {type(by_name[b]).__name__}, which is never called: its "
                    f"branch multiplier would not apply. Name the branches inside it (e.g. '{b}.*').")
            if isinstance(by_name[b], nn.modules.linear.NonDynamicallyQuantizableLinear):
                raise ValueError(
                    f"residual_branches matches {b!r}, the out_proj of an nn.MultiheadAttention, which never calls "
                    "it: its branch multiplier would not apply. Name the attention module itself.")
    if residual_branches and depth is None:
        raise ValueError("residual_branches needs depth (the number of residual blocks L)")
    in_branch = [v for v, (mname, *_rest) in views.items()
                 if any(mname == b or mname.startswith(b + ".") for b in branch_modules)]
    layout = core.with_layouts({v: _layout(t[1], t[2], t[3]) for v, t in views.items()}, layouts)
    shapes = {v: (tuple(t[3].shape), layout[v]) for v, t in views.items()}
    base_shapes = {v: tuple(base_views[v][3].shape) for v in views}
    table = core.build_table(
        shapes, base_shapes, optimizer=optimizer, parameterization=parameterization, gamma=gamma, depth=depth,
        residual_branch=in_branch, overrides=overrides, init_sigma=init_sigma, zero_readout=zero_readout,
        delta_shapes=None if delta_model is None else {v: tuple(t[3].shape) for v, t in _views(delta_model)[0].items()},
        gamma_depth=gamma_depth if gamma_depth is not None else depth if depth is not None else sum(
            len(shapes[vs[0]][0]) >= 2 and shapes[vs[0]][1] != "vector" for vs in aliases.values()),
    )
    for name, vs in aliases.items():
        first = table[vs[0]]
        for v in vs[1:]:
            if (table[v].lr_mult, table[v].wd_mult) != (first.lr_mult, first.wd_mult):
                raise ValueError(
                    f"tied parameter {name!r} gets different learning rates as {vs[0]!r} ({table[vs[0]].role}) "
                    f"and as {v!r} ({table[v].role}); pass overrides={{{v!r}: ...}} to choose one role"
                )
    branch_mult = core.depth_multiplier(depth)
    attention = core.resolve_attention(attention, parameterization)
    branches = list({id(by_name[b]): by_name[b] for b in branch_modules}.values())  # a shared block once
    return views, aliases, table, branches, branch_mult, attention


def mup_table(model: nn.Module, base_model: nn.Module, *, optimizer: str = "adam", parameterization: str = "mup",
              gamma: float = 1.0, depth: int | None = None, overrides: Mapping[str, str] | None = None,
              residual_branches: Sequence[str] | None = None, init_sigma: float = 1.0,
              zero_readout: bool = False, delta_model: nn.Module | None = None,
              layouts: Mapping[str, str] | None = None, gamma_depth: int | None = None) -> dict:
    """``{name: curvopt.mup.ParamScaling}`` for every parameter (canonical names; a tied parameter's other
    names are included too), without touching the model. Takes these arguments of :func:`parameterize`, with
    the same meaning: ``optimizer``, ``parameterization``, ``gamma``, ``depth``, ``overrides``,
    ``residual_branches``, ``init_sigma``, ``zero_readout``, ``delta_model``, ``layouts``, ``gamma_depth`` (not
    ``attention``, ``reinit``, ``lr``, ``weight_decay`` or ``generator``, which do not change the table)."""
    _, _, table, _, _, _ = _build(model, base_model, optimizer=optimizer, parameterization=parameterization,
                                  gamma=gamma, depth=depth, overrides=overrides,
                                  residual_branches=residual_branches, init_sigma=init_sigma, attention=None,
                                  zero_readout=zero_readout, delta_model=delta_model, layouts=layouts,
                                  gamma_depth=gamma_depth)
    return table


def mup_multipliers(model: nn.Module, base_model: nn.Module, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """``{name: {"role", "init_std", "forward_mult", "lr_mult", "wd_mult"}}``: :func:`mup_table` as numbers."""
    return core.table_numbers(mup_table(model, base_model, **kwargs))


def _keep(module: nn.Module, handle: Any) -> None:
    module.__dict__.setdefault(_HANDLES_ATTR, []).append(handle)


def remove_parameterization(model: nn.Module) -> None:
    """Remove the hooks installed by :func:`parameterize` on ``model``'s modules, whichever call installed them
    (on ``model``, on a submodule, or on a model that contains it: each hook's handle is kept on the module it
    hooks); weights are left as they are."""
    for mod in model.modules():
        for h in mod.__dict__.pop(_HANDLES_ATTR, ()):
            h.remove()
        mod.__dict__.pop(_TABLE_ATTR, None)


def parameterize(
    model: nn.Module,
    base_model: nn.Module,
    *,
    optimizer: str = "adam",
    parameterization: str = "mup",
    gamma: float = 1.0,
    depth: int | None = None,
    overrides: Mapping[str, str] | None = None,
    residual_branches: Sequence[str] | None = None,
    attention: str | None = None,
    init_sigma: float = 1.0,
    zero_readout: bool = False,
    delta_model: nn.Module | None = None,
    layouts: Mapping[str, str] | None = None,
    gamma_depth: int | None = None,
    reinit: bool = True,
    lr: float = 1.0,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
) -> MuPParamGroups:
    """Parameterise ``model`` relative to ``base_model`` (same architecture, narrower) in place.

    * Roles are inferred by comparing each parameter's shape with the same-named parameter of ``base_model``
      (:func:`curvopt.mup.infer_role`); ``overrides={name or glob: role}`` fixes the cases inference gets
      wrong (``"input"``, ``"hidden"``, ``"output"``, ``"finite"``, ``"embedding"``). Tied weights are
      recognised; their views must agree on the learning rate.
    * ``layouts={name or glob: layout}`` (:data:`curvopt.mup.LAYOUTS`) says how a tensor's axes map to fan-in
      and fan-out where the default (``[out, in, *kernel]``; ``"vector"`` for 0-d/1-d tensors, norm layers'
      gains and biases and weight norms' magnitudes; ``nn.Embedding``: ``"embedding"``) is wrong: e.g.
      ``{"cls_token": "vector", "pos_embed": "vector"}`` for timm's ``[1, T, d]`` tokens, which are added to the
      activations (every axis fan-out; kept as initialised).
    * ``reinit``: weights (≥ 2-D, not ``"vector"``) are redrawn from ``N(0, init_std²)`` of the table
      (``init_std = init_sigma / sqrt(fan_in)`` times the parameterisation's factor; embeddings ``init_sigma``);
      vectors keep their values, and so do frozen parameters (``requires_grad=False``: pretrained weights).
      ``zero_readout=True``: output-role weights start at 0 (TP5's advice).
    * ``delta_model``: optional third model of another width (as ``mup``'s ``delta``): roles come from
      ``base_model`` vs ``delta_model``, multipliers from ``model`` vs ``base_model``. Needed when ``model``
      is as wide as ``base_model`` but should still get γ's output multiplier or ``zero_readout``.
    * Forward multipliers (μP/NTK readout ``1/m``, γ's ``1/γ``) and the depth-μP branch multiplier
      ``1/sqrt(depth)`` on the modules named by ``residual_branches`` (globs over module names) are
      installed as hooks (see the module docstring).
    * Returns param groups: ``lr = lr * lr_mult`` and ``weight_decay = weight_decay * wd_mult``, plus
      ``param_names``. With the default ``lr=1`` the group ``lr`` is the *relative* multiplier, which is what
      curvopt's tuners expect (they multiply it by their global scale); for a plain ``torch.optim`` optimizer
      pass the base learning rate as ``lr``.

    ``attention``: ``"1/d"`` or ``"1/sqrt(d)"`` (default: ``"1/d"`` under μP) is recorded on the result; use
    ``groups.attention_scale(head_dim, base_head_dim)`` as the ``scale`` of your attention (``1/d`` with an
    ``nn.MultiheadAttention``, whose scale is fixed, warns). ``gamma_depth``: the ``L`` of the γ rule
    (:func:`curvopt.mup.build_table`). ``optimizer``: the family the learning-rate multipliers are for,
    ``"adam"`` (default; ``"adamw"``, ``"rmsprop"``, ... are Adam-like) or ``"sgd"`` (``"momentum"``,
    ``"nesterov"``, ...; :func:`curvopt.mup.optimizer_family`). ``parameterization``: ``"mup"`` (default),
    ``"ntk"`` or ``"sp"`` (the standard one: no width multipliers; :func:`curvopt.mup.role_scaling`).
    ``generator``: the ``torch.Generator`` of ``reinit``'s draws (None: torch's default generator).
    """
    check_positive("lr", lr)
    check_nonnegative("weight_decay", weight_decay)
    views, aliases, table, branches, branch_mult, attention = _build(
        model, base_model, optimizer=optimizer, parameterization=parameterization, gamma=gamma, depth=depth,
        overrides=overrides, residual_branches=residual_branches, init_sigma=init_sigma, attention=attention,
        zero_readout=zero_readout, delta_model=delta_model, layouts=layouts, gamma_depth=gamma_depth)
    for message in core.readout_messages(table, parameterization, overrides):
        warn(message)
    if attention == "1/d" and any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        warn("curvopt.mup: nn.MultiheadAttention scales its logits by 1/sqrt(head_dim), which cannot be "
             "changed, so μP's 1/d attention does not apply to it (the attention logits' updates grow with "
             "width). Use an attention of your own with scale=groups.attention_scale(head_dim, "
             "base_head_dim) (e.g. F.scaled_dot_product_attention(q, k, v, scale=...)), or pass "
             "attention='1/sqrt(d)' to record what the model does.")

    # Check every non-unit forward multiplier can be applied before changing anything.
    module_mult: dict[int, tuple[nn.Module, float, str]] = {}  # by module: one hook for a module under two names
    for v, (mname, mod, pname, p) in views.items():
        c = table[v].forward_mult
        if c == 1.0:
            continue
        if isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
            raise ValueError(
                f"curvopt.mup: parameter {v!r} needs forward multiplier {c:g}, but nn.MultiheadAttention never "
                "calls its out_proj (F.multi_head_attention_forward reads the weight), so a hook would not apply "
                "it. Use an attention of your own with nn.Linear projections, or override the role.")
        if isinstance(mod, _LINEAR_IN_INPUT) and pname == "weight":
            kind = "input"
        elif isinstance(mod, nn.Embedding) and pname == "weight":
            kind = "output"
        else:
            raise ValueError(
                f"curvopt.mup: parameter {v!r} needs forward multiplier {c:g} but its module is a "
                f"{type(mod).__name__}; only nn.Linear, nn.ConvNd and nn.Embedding weights are supported. "
                "Apply it in your forward from mup_table(...) or override the role; a tensor that is no weight (a "
                "gain, an offset added to the activations) is a vector: layouts={name: 'vector'}."
            )
        if module_mult.setdefault(id(mod), (mod, c, kind)) != (mod, c, kind):
            raise ValueError(f"curvopt.mup: module {mname!r} is reachable under several names that need different "
                             "forward multipliers; pass overrides to give its parameters one role")

    remove_parameterization(model)
    if reinit:
        with torch.no_grad():
            for name, vs in aliases.items():
                # a tied embedding/unembedding is drawn as the embedding (mup's MuSharedReadout), whichever
                # module registered it first; the readout view keeps its forward multiplier
                std = table[next((v for v in vs if table[v].role != "output"), vs[0])].init_std
                p = views[vs[0]][3]
                if std is not None and p.requires_grad:  # a frozen (pretrained) weight keeps its values
                    p.normal_(0.0, std, generator=generator)
                    for v in vs:  # as torch's own reset_parameters: the pad row stays 0, under any of the names
                        mod = views[v][1]
                        if getattr(mod, "padding_idx", None) is not None and p is mod.weight:
                            p[mod.padding_idx].zero_()
    for mod, c, kind in module_mult.values():  # each handle kept on its module: a later call on a submodule
        if kind == "input":                     # (or on the model) finds and replaces it
            _keep(mod, mod.register_forward_pre_hook(_ScaleInput(c), with_kwargs=True))
        else:
            _keep(mod, mod.register_forward_hook(_ScaleOutput(c)))
    for mod in branches:
        _keep(mod, mod.register_forward_hook(_ScaleOutput(branch_mult)))
    canonical_table = {n: table[vs[0]] for n, vs in aliases.items()}
    model.__dict__[_TABLE_ATTR] = canonical_table

    groups: dict[tuple[float, float], dict] = {}
    for name, vs in aliases.items():
        s = table[vs[0]]
        g = groups.setdefault((s.lr_mult, s.wd_mult), {
            "params": [], "param_names": [], "lr": lr * s.lr_mult, "weight_decay": weight_decay * s.wd_mult})
        g["params"].append(views[vs[0]][3])
        g["param_names"].append(name)
    out = MuPParamGroups(groups.values())
    out.table = canonical_table
    out.branch_multiplier = branch_mult
    out.attention = attention
    return out
