"""The precision a forward pass computed in, read from its gradient (for the closure-free probing step).

Closure-free, the forward pass ran before the tuner's step, so its precision cannot be watched the way a closure
or ``value_fn`` can (PyTorch: a function mode on one call; Optax: the jaxpr). It leaves a trace in the gradient,
though: the gradient of a parameter whose operation computed in bfloat16 (under ``torch.autocast``, or a flax
module with ``dtype=bfloat16``) is a bfloat16 tensor cast up, every entry exactly representable in bfloat16,
which an entry computed in float32 is with a chance of 2^-16. Measured on the benchmark's models (PyTorch,
bf16 autocast): 87-100 % of the nonzero gradient entries representable in bfloat16 (the rest: parameters of
operations autocast keeps in float32, such as normalisation layers, and embedding rows summed over several
tokens), 0.0-0.1 % in float32. A gradient rescaled by a factor that is not a power of two (an outside norm clip,
accumulated micro-batches) loses the trace; a loss scaler's power of two keeps it.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["HALF_DTYPES", "MIN_NONZERO", "REPRESENTABLE_SHARE", "gradient_compute_eps"]

#: the half-precision dtypes a forward pass may compute in, coarsest first, with their machine epsilons
HALF_DTYPES: tuple[tuple[str, float], ...] = (("bfloat16", 2.0 ** -7), ("float16", 2.0 ** -10))
#: the share of the gradient's nonzero entries exactly representable in a half dtype from which on the forward
#: pass is taken to have computed in it
REPRESENTABLE_SHARE = 0.5
#: fewer nonzero gradient entries than this tell nothing (small integers are representable in any dtype)
MIN_NONZERO = 64


def gradient_compute_eps(nonzero: Any, representable: Sequence[Any], xp: Any) -> Any:
    """The machine epsilon of the coarsest of :data:`HALF_DTYPES` in which at least :data:`REPRESENTABLE_SHARE`
    of the gradient's ``nonzero`` entries (at least :data:`MIN_NONZERO` of them) are exactly representable, else
    0. ``representable``: per dtype of :data:`HALF_DTYPES`, in its order, the count of nonzero entries that
    are."""
    eps = nonzero * 0.0
    enough = nonzero >= MIN_NONZERO
    for (_, dtype_eps), count in reversed(list(zip(HALF_DTYPES, representable))):  # the coarsest decides last
        eps = xp.where(enough & (count >= REPRESENTABLE_SHARE * nonzero), dtype_eps, eps)
    return eps
