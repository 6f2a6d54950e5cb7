"""Tasks: data + model (per backend) + loss, for one experiment of a suite.

A task is one of ``mlp``, ``resnet``, ``vit`` (images) or ``lm`` (bytes). :func:`torch_problem` and
:func:`jax_problem` build everything a run needs for one (experiment, width, seed): the training data in
its regime (``full`` = a fixed subset, all of it every step; ``mini`` = shuffled batches with a fixed seed),
the held-out evaluation split, the model and its initial weights, and the loss (mean cross-entropy; for
``lm`` over every next-byte prediction). The JAX problem copies the torch model's initial weights, so both
backends start from identical parameters.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from . import data as data_mod

__all__ = ["TASKS", "TaskInfo", "get_dataset", "torch_problem", "jax_problem", "train_eval_arrays"]


@dataclass(frozen=True)
class TaskInfo:
    kind: str  # "image" | "text"
    base: str  # the base optimizer the paper pairs with the task: "gd" | "momentum" | "adam"
    model: dict = field(default_factory=dict)  # default model options


TASKS: dict[str, TaskInfo] = {
    "mlp": TaskInfo("image", "gd", {"depth": 2}),
    "resnet": TaskInfo("image", "gd", {"depth": 1, "stages": 2, "norm": "none"}),
    "vit": TaskInfo("image", "adam", {"depth": 2, "heads": 2, "patch": 2, "mlp_ratio": 2}),
    "lm": TaskInfo("text", "adam", {"depth": 2, "heads": 2, "mlp_ratio": 2}),
}


@functools.lru_cache(maxsize=8)
def get_dataset(kind: str, image_set: str = "digits", data_dir: str | None = None, text_path: str | None = None,
                block_len: int = 64) -> data_mod.Dataset:
    """Cached per process: every run of a sweep shares the loaded arrays."""
    return data_mod.load_dataset(kind, data_dir=data_dir, image_set=image_set, text_path=text_path,
                                 block_len=block_len)


def dataset_for(exp) -> data_mod.Dataset:
    kind = TASKS[exp.task].kind
    return get_dataset(kind, exp.image_set, exp.data_dir, exp.text_path, exp.block_len)


def train_eval_arrays(exp, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training arrays of the regime (full: the fixed subset; mini: the whole train split) and the eval split."""
    ds = dataset_for(exp)
    if exp.regime == "full":
        x, y = data_mod.full_batch_subset(ds.x_train, ds.y_train, exp.full_batch_size, seed=0)
    else:
        x, y = ds.x_train, ds.y_train
    xe, ye = data_mod.full_batch_subset(ds.x_test, ds.y_test, exp.eval_size, seed=0)
    return x, y, xe, ye


def model_options(exp, param: str = "sp") -> dict:
    """The model's options: the task's defaults, the experiment's overrides, and under μP the ``1/d``
    attention-logit scale for the transformers."""
    opts = dict(TASKS[exp.task].model)
    opts.update(exp.model)
    if param == "mup" and exp.task in ("vit", "lm"):
        opts.setdefault("attn_scale", "mup")
    return opts


# -------------------------------------------------------------------------------------------- torch
@dataclass
class TorchProblem:
    model: Any
    x: Any
    y: Any
    x_eval: Any
    y_eval: Any
    regime: str
    batch_size: int
    seed: int
    n_params: int

    def loss(self, logits, y):
        import torch.nn.functional as F

        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def batches(self) -> Iterator[tuple[Any, Any]]:
        if self.regime == "full":
            while True:
                yield self.x, self.y
        loader = data_mod.torch_loader(self.x.numpy(), self.y.numpy(), self.batch_size, seed=self.seed)
        while True:
            yield from loader

    def evaluate(self, chunk: int = 512) -> tuple[float, float]:
        import torch

        was = self.model.training
        self.model.eval()
        tot_loss, tot_acc, n = 0.0, 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.x_eval), chunk):
                xb, yb = self.x_eval[i:i + chunk], self.y_eval[i:i + chunk]
                logits = self.model(xb)
                m = yb.numel()
                tot_loss += float(self.loss(logits, yb)) * m
                tot_acc += float((logits.argmax(-1) == yb).float().mean()) * m
                n += m
        self.model.train(was)
        return tot_loss / n, tot_acc / n


def torch_model(exp, width: int, seed: int, param: str = "sp"):
    from . import models_torch

    ds = dataset_for(exp)
    return models_torch.build_model(exp.task, ds.input_shape, ds.num_classes, width, seed=seed,
                                    **model_options(exp, param))


def torch_problem(exp, width: int, seed: int, dtype=None, param: str = "sp") -> TorchProblem:
    """The torch side of a run; ``param="mup"`` builds the model with μP's attention scale (the runner then
    re-initialises it with ``torch_backend.mup.parameterize``)."""
    import torch

    dtype = dtype or torch.float32
    model = torch_model(exp, width, seed, param).to(dtype)
    x, y, xe, ye = train_eval_arrays(exp, seed)
    tx = (lambda a: torch.from_numpy(a)) if TASKS[exp.task].kind == "text" else (
        lambda a: torch.from_numpy(a).to(dtype))
    return TorchProblem(model, tx(x), torch.from_numpy(y), tx(xe), torch.from_numpy(ye), exp.regime,
                        exp.batch_size, seed, sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------- jax
@dataclass
class JaxProblem:
    model: Any
    params: Any
    x: np.ndarray
    y: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    regime: str
    batch_size: int
    seed: int
    n_params: int

    def loss_fn(self, params, batch):
        """``value_fn(params, batch=(x, y))``: mean cross-entropy (the Optax line-search convention)."""
        import optax

        x, y = batch
        logits = self.model.apply({"params": params}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).mean()

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import jax.numpy as jnp

        if self.regime == "full":
            b = (jnp.asarray(self.x), jnp.asarray(self.y))
            while True:
                yield b
        for xb, yb in data_mod.minibatches(self.x, self.y, self.batch_size, seed=self.seed):
            yield jnp.asarray(xb), jnp.asarray(yb)

    def evaluate(self, params, chunk: int = 512) -> tuple[float, float]:
        import jax.numpy as jnp

        _ev = _jax_eval_fn(self.model)
        tot_loss, tot_acc, n = 0.0, 0.0, 0
        for i in range(0, len(self.x_eval), chunk):
            xb, yb = jnp.asarray(self.x_eval[i:i + chunk]), jnp.asarray(self.y_eval[i:i + chunk])
            lo, ac = _ev(params, xb, yb)
            m = yb.size
            tot_loss += float(lo) * m
            tot_acc += float(ac) * m
            n += m
        return tot_loss / n, tot_acc / n


@functools.lru_cache(maxsize=4)
def _jax_eval_fn(model):
    """Jitted (loss, accuracy) for a flax model (cached: flax modules are hashable dataclasses)."""
    import jax
    import optax

    @jax.jit
    def _ev(p, x, y):
        logits = model.apply({"params": p}, x, train=False)
        lg, yy = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        return optax.softmax_cross_entropy_with_integer_labels(lg, yy).mean(), (lg.argmax(-1) == yy).mean()

    return _ev


def jax_problem(exp, width: int, seed: int) -> JaxProblem:
    """The flax twin of :func:`torch_problem`, initialised with a copy of the torch model's weights."""
    from . import models_flax

    if model_options(exp).get("norm") == "batchnorm":
        raise NotImplementedError("the JAX runner does not thread BatchNorm statistics; use norm=none/"
                                  "layernorm/groupnorm with --backend jax")
    ds = dataset_for(exp)
    tm = torch_model(exp, width, seed)
    fm = models_flax.build_model(exp.task, ds.input_shape, ds.num_classes, width, **model_options(exp))
    params = models_flax.torch_to_flax(tm)["params"]
    x, y, xe, ye = train_eval_arrays(exp, seed)
    return JaxProblem(fm, params, x, y, xe, ye, exp.regime, exp.batch_size, seed,
                      sum(p.numel() for p in tm.parameters()))
