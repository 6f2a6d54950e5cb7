"""Benchmark models in flax.linen: ``mlp``, ``resnet``, ``vit``, ``lm`` — the architectures of
:mod:`benchmarks.models_torch`, layer for layer, with the same initialisation distributions.

Why flax.linen (rather than equinox): it is the most widely used JAX network library, its parameters are
a plain nested dict that ``optax`` consumes as is (``opt.update(grads, state, params)``), mutable
collections cover BatchNorm statistics, and module names map one-to-one onto torch module paths, which
makes copying weights between the two frameworks a small dictionary transform (:func:`torch_to_flax`).

Submodule names mirror torch paths with ``.`` -> ``/`` and list indices joined by ``_``
(``blocks.0.attn.qkv`` -> ``blocks_0/attn/qkv``). Weight layouts: torch ``Linear.weight (out, in)`` is
flax ``Dense.kernel (in, out)``; torch ``Conv2d.weight (out, in, kh, kw)`` is flax ``Conv.kernel
(kh, kw, in, out)``; norm ``weight`` is ``scale``; ``Embedding.weight`` is ``Embed.embedding``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MLP", "ResNet", "ViT", "LM", "build_model", "init_variables", "torch_to_flax", "NORMS"]

NORMS = ("none", "layernorm", "groupnorm", "batchnorm")

w_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")  # N(0, 1/fan_in), untruncated
b_init = nn.initializers.zeros


def Dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=w_init, bias_init=b_init, name=name)


def gelu(x):
    return nn.gelu(x, approximate=False)  # torch's default (erf) GELU


class MLP(nn.Module):
    num_classes: int
    width: int = 64
    depth: int = 2

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = nn.relu(Dense(self.width, f"layers_{i}")(x))
        return Dense(self.num_classes, "head")(x)


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class Norm(nn.Module):
    """Identity / LayerNorm over (H, W, C) / GroupNorm / BatchNorm, matching ``models_torch.make_norm``."""

    kind: str
    channels: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        if self.kind == "none":
            return x
        if self.kind == "layernorm":
            return nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False, name="norm")(x)
        if self.kind == "groupnorm":
            return nn.GroupNorm(num_groups=_groups(self.channels), epsilon=1e-5, use_fast_variance=False,
                                name="norm")(x)
        if self.kind == "batchnorm":
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                use_fast_variance=False, name="norm")(x)
        raise ValueError(f"norm must be one of {NORMS}, got {self.kind!r}")


def _conv(c_out: int, k: int, stride: int, name: str) -> nn.Conv:
    pad = (k - 1) // 2
    return nn.Conv(c_out, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   kernel_init=w_init, bias_init=b_init, name=name)


class PreActBlock(nn.Module):
    c_in: int
    c_out: int
    stride: int
    norm: str

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.relu(Norm(self.norm, self.c_in, name="norm1")(x, train))
        if self.stride != 1 or self.c_in != self.c_out:
            sc = _conv(self.c_out, 1, self.stride, "shortcut")(h)
        else:
            sc = x
        h = _conv(self.c_out, 3, self.stride, "conv1")(h)
        h = _conv(self.c_out, 3, 1, "conv2")(nn.relu(Norm(self.norm, self.c_out, name="norm2")(h, train)))
        return h + sc


class ResNet(nn.Module):
    num_classes: int
    width: int = 16
    depth: int = 1
    stages: int = 2
    norm: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = _conv(self.width, 3, 1, "stem")(x)
        c, i = self.width, 0
        for s in range(self.stages):
            c_out = self.width * 2 ** s
            for b in range(self.depth):
                x = PreActBlock(c, c_out, 2 if (s > 0 and b == 0) else 1, self.norm, name=f"blocks_{i}")(x, train)
                c, i = c_out, i + 1
        x = nn.relu(Norm(self.norm, c, name="norm")(x, train)).mean(axis=(1, 2))
        return Dense(self.num_classes, "head")(x)


class Attention(nn.Module):
    dim: int
    heads: int
    causal: bool
    attn_scale: str = "sqrt"

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dh = d // self.heads
        scale = dh ** -0.5 if self.attn_scale == "sqrt" else 1.0 / dh
        qkv = Dense(3 * d, "qkv")(x).reshape(b, t, 3, self.heads, dh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = (q @ k.swapaxes(-1, -2)) * scale
        if self.causal:
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))
            s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
        a = jax.nn.softmax(s, axis=-1) @ v
        return Dense(d, "proj")(a.transpose(0, 2, 1, 3).reshape(b, t, d))


class MLPBlock(nn.Module):
    dim: int
    ratio: int

    @nn.compact
    def __call__(self, x):
        return Dense(self.dim, "fc2")(gelu(Dense(self.ratio * self.dim, "fc1")(x)))


class Block(nn.Module):
    dim: int
    heads: int
    mlp_ratio: int
    causal: bool
    attn_scale: str = "sqrt"

    @nn.compact
    def __call__(self, x):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)  # noqa: E731
        x = x + Attention(self.dim, self.heads, self.causal, self.attn_scale, name="attn")(ln("ln1")(x))
        return x + MLPBlock(self.dim, self.mlp_ratio, name="mlp")(ln("ln2")(x))


def patchify(x, patch: int):
    n, h, w, c = x.shape
    x = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


class ViT(nn.Module):
    num_classes: int
    width: int = 32
    depth: int = 2
    heads: int = 2
    patch: int = 2
    mlp_ratio: int = 2
    attn_scale: str = "sqrt"

    @nn.compact
    def __call__(self, x, train: bool = True):
        p = patchify(x, self.patch)
        pos = self.param("pos_emb", nn.initializers.normal(0.02), (p.shape[1], self.width), x.dtype)
        x = Dense(self.width, "embed")(p) + pos
        for i in range(self.depth):
            x = Block(self.width, self.heads, self.mlp_ratio, False, self.attn_scale, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln_f")(x).mean(axis=1)
        return Dense(self.num_classes, "head")(x)


class LM(nn.Module):
    num_classes: int = 256
    block_len: int = 64
    width: int = 32
    depth: int = 2
    heads: int = 2
    mlp_ratio: int = 2
    attn_scale: str = "sqrt"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        t = x.shape[1]
        tok = nn.Embed(self.num_classes, self.width, embedding_init=nn.initializers.normal(1.0),
                       param_dtype=self.param_dtype, name="tok_emb")(x)
        pos = self.param("pos_emb", nn.initializers.normal(0.02), (self.block_len, self.width),
                         self.param_dtype)
        h = tok + pos[:t]
        for i in range(self.depth):
            h = Block(self.width, self.heads, self.mlp_ratio, True, self.attn_scale, name=f"blocks_{i}")(h)
        h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln_f")(h)
        return Dense(self.num_classes, "head")(h)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, width: int, **kwargs) -> nn.Module:
    """The flax twin of ``models_torch.build_model`` (same keyword options)."""
    if name == "mlp":
        return MLP(num_classes, width=width, **kwargs)
    if name == "resnet":
        return ResNet(num_classes, width=width, **kwargs)
    if name == "vit":
        return ViT(num_classes, width=width, **kwargs)
    if name == "lm":
        (block_len,) = input_shape
        return LM(num_classes, block_len=block_len, width=width, **kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of ['lm', 'mlp', 'resnet', 'vit']")


def init_variables(model: nn.Module, input_shape: Sequence[int], seed: int = 0, dtype=jnp.float32,
                   is_text: bool = False) -> dict:
    """Flax variables (``{"params": ..., ["batch_stats": ...]}``) from flax's own initialisers."""
    x = jnp.zeros((2, *input_shape), dtype=jnp.int32 if is_text else dtype)
    return model.init(jax.random.PRNGKey(seed), x, train=False)


def _flax_path(torch_path: str) -> list[str]:
    parts: list[str] = []
    for p in torch_path.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return parts


def torch_to_flax(torch_model, dtype=None) -> dict:
    """Copy a ``models_torch`` model's weights (and BatchNorm statistics) into flax variables.

    Returns ``{"params": ..., ["batch_stats": ...]}`` with NumPy-backed ``jnp`` arrays in ``dtype``
    (default: the torch parameters' dtype). The result plugs into the matching ``models_flax`` model's
    ``apply``; both forward passes then agree to floating-point tolerance.
    """
    import torch.nn as tnn

    params: dict = {}
    stats: dict = {}

    def put(tree: dict, path: list[str], value):
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        arr = value.detach().cpu().numpy()
        tree[path[-1]] = jnp.asarray(arr if dtype is None else arr.astype(dtype))

    for mod_name, m in torch_model.named_modules():
        base = _flax_path(mod_name) if mod_name else []
        if isinstance(m, tnn.Linear):
            put(params, base + ["kernel"], m.weight.T)
            if m.bias is not None:
                put(params, base + ["bias"], m.bias)
        elif isinstance(m, tnn.Conv2d):
            put(params, base + ["kernel"], m.weight.permute(2, 3, 1, 0))
            if m.bias is not None:
                put(params, base + ["bias"], m.bias)
        elif isinstance(m, tnn.Embedding):
            put(params, base + ["embedding"], m.weight)
        elif isinstance(m, (tnn.LayerNorm, tnn.GroupNorm, tnn.BatchNorm2d)):
            # flax's Norm wrapper adds a "norm" level for conv norms; LayerNorm in transformers has none
            lvl = base + (["norm"] if isinstance(m, (tnn.GroupNorm, tnn.BatchNorm2d)) else [])
            if m.weight is not None:
                put(params, lvl + ["scale"], m.weight)
                put(params, lvl + ["bias"], m.bias)
            if isinstance(m, tnn.BatchNorm2d):
                put(stats, lvl + ["mean"], m.running_mean)
                put(stats, lvl + ["var"], m.running_var)
        else:  # raw parameters owned directly by this module (e.g. pos_emb)
            for pname, p in m.named_parameters(recurse=False):
                put(params, base + [pname], p)
    out = {"params": params}
    if stats:
        out["batch_stats"] = stats
    return out
