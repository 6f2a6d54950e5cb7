"""Benchmark models in plain ``torch.nn``: ``mlp``, ``resnet``, ``vit``, ``lm``.

The same architectures exist in flax.linen in :mod:`benchmarks.models_flax`, with parameter names that
mirror these module paths (``blocks.0.attn.qkv.weight`` <-> ``blocks_0/attn/qkv/kernel``), so that
:func:`benchmarks.models_flax.torch_to_flax` copies a torch model's weights into flax variables and both
forward passes agree (tested in float64).

Conventions shared by both backends:

* image inputs are NHWC (``N x H x W x C``, as :mod:`benchmarks.data` returns them); the torch models
  permute to NCHW internally, so both frameworks consume the very same array;
* initialisation: every ``Linear``/``Conv`` weight ~ N(0, 1/fan_in), biases 0, norm scales 1 and shifts
  0, token embeddings ~ N(0, 1), positional embeddings ~ N(0, 0.02^2) (standard parameterisation; μP is
  applied on top by ``curvopt``'s μP helpers);
* activations: ReLU in ``mlp``/``resnet``, exact (erf) GELU in the transformers;
* norms use eps = 1e-5; attention scores are scaled by ``1/sqrt(d_head)`` (``attn_scale="sqrt"``) or
  ``1/d_head`` (``attn_scale="mup"``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLP", "ResNet", "ViT", "LM", "build_model", "init_weights", "NORMS"]

NORMS = ("none", "layernorm", "groupnorm", "batchnorm")


def init_weights(model: nn.Module) -> nn.Module:
    """The shared initialisation (see module docstring), applied in place."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, std=fan_in ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith("pos_emb"):
            nn.init.normal_(p, std=0.02)
    return model


# ----------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Flatten -> [Linear(width) -> ReLU] x depth -> Linear(num_classes)."""

    def __init__(self, input_shape, num_classes: int, width: int = 64, depth: int = 2):
        super().__init__()
        d_in = math.prod(input_shape)
        self.layers = nn.ModuleList()
        for i in range(depth):
            self.layers.append(nn.Linear(d_in if i == 0 else width, width))
        self.head = nn.Linear(width if depth else d_in, num_classes)
        init_weights(self)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


# -------------------------------------------------------------------------------------------- ResNet
def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


def make_norm(kind: str, c: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "layernorm":  # LayerNorm over (C, H, W) == GroupNorm with one group
        return nn.GroupNorm(1, c, eps=1e-5)
    if kind == "groupnorm":
        return nn.GroupNorm(_groups(c), c, eps=1e-5)
    if kind == "batchnorm":
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class PreActBlock(nn.Module):
    """norm -> ReLU -> conv3x3(stride) -> norm -> ReLU -> conv3x3, plus identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.norm1 = make_norm(norm, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm2 = make_norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if (stride != 1 or c_in != c_out) else None

    def forward(self, x):
        h = F.relu(self.norm1(x))
        sc = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        return h + sc


class ResNet(nn.Module):
    """Pre-activation ResNet: stem conv3x3 -> ``stages`` stages of ``depth`` blocks (channels
    ``width * 2**s``, stride 2 at the start of every stage after the first) -> norm -> ReLU -> global
    average pool -> Linear. No BatchNorm by default (``norm="none"``)."""

    def __init__(self, input_shape, num_classes: int, width: int = 16, depth: int = 1, stages: int = 2,
                 norm: str = "none"):
        super().__init__()
        c_in = input_shape[-1]
        self.stem = nn.Conv2d(c_in, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        c = width
        for s in range(stages):
            c_out = width * 2 ** s
            for b in range(depth):
                self.blocks.append(PreActBlock(c, c_out, 2 if (s > 0 and b == 0) else 1, norm))
                c = c_out
        self.norm = make_norm(norm, c)
        self.head = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stem(x.permute(0, 3, 1, 2))
        for blk in self.blocks:
            x = blk(x)
        x = F.relu(self.norm(x)).mean(dim=(2, 3))
        return self.head(x)


# --------------------------------------------------------------------------------------- Transformer
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, attn_scale: str):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        d_head = dim // heads
        self.scale = d_head ** -0.5 if attn_scale == "sqrt" else 1.0 / d_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) * self.scale
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        a = torch.softmax(s, dim=-1) @ v  # (b, h, t, dh)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool, attn_scale: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads, causal, attn_scale)
        self.ln2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLPBlock(dim, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def patchify(x, patch: int):
    """NHWC image -> (N, tokens, patch*patch*C), row-major over patches, (ph, pw, c) within a patch."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // patch, patch, w // patch, patch, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


class ViT(nn.Module):
    """Vision Transformer: linear patch embedding (== conv with kernel = stride = patch) + learned
    positional embedding -> ``depth`` pre-LN blocks -> LN -> mean pool -> Linear. width = embed dim."""

    def __init__(self, input_shape, num_classes: int, width: int = 32, depth: int = 2, heads: int = 2,
                 patch: int = 2, mlp_ratio: int = 2, attn_scale: str = "sqrt"):
        super().__init__()
        h, w, c = input_shape
        if h % patch or w % patch:
            raise ValueError(f"image {h}x{w} not divisible by patch {patch}")
        self.patch = patch
        self.embed = nn.Linear(patch * patch * c, width)
        self.pos_emb = nn.Parameter(torch.zeros((h // patch) * (w // patch), width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, False, attn_scale) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width, eps=1e-5)
        self.head = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.embed(patchify(x, self.patch)) + self.pos_emb
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x).mean(dim=1))


class LM(nn.Module):
    """Decoder-only byte transformer: token + positional embedding -> ``depth`` causal pre-LN blocks
    -> LN -> Linear(vocab). width = embed dim. Returns logits (N, T, vocab)."""

    def __init__(self, input_shape, num_classes: int = 256, width: int = 32, depth: int = 2, heads: int = 2,
                 mlp_ratio: int = 2, attn_scale: str = "sqrt"):
        super().__init__()
        (block_len,) = input_shape
        self.tok_emb = nn.Embedding(num_classes, width)
        self.pos_emb = nn.Parameter(torch.zeros(block_len, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, True, attn_scale) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width, eps=1e-5)
        self.head = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok_emb(x) + self.pos_emb[:t]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


_MODELS = {"mlp": MLP, "resnet": ResNet, "vit": ViT, "lm": LM}


def build_model(name: str, input_shape, num_classes: int, width: int, seed: int = 0, **kwargs) -> nn.Module:
    """Build ``name`` in {mlp, resnet, vit, lm} with torch's RNG seeded by ``seed`` (restored afterwards)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MODELS[name](tuple(input_shape), num_classes, width=width, **kwargs)
