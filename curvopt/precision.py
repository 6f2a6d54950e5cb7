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

Data-parallel training averages the ranks' gradients in float32 (DDP's all-reduce, FSDP's reduce-scatter): the
average of ``n`` bfloat16 values has up to ``ceil(log2 n)`` more significant bits, plus what the spread of their
exponents adds, so few entries are still exactly representable (measured on a GELU MLP under bf16 autocast, the
gradient averaged over ``n`` equal shards of the batch: 41 / 17 / 6 % of the entries at ``n`` = 2 / 4 / 8, against 100
% at 1). An entry counts as computed in a half dtype when it has at most the dtype's significant bits plus
:func:`summed_bits` of the number of gradients averaged (:func:`significant_bit_budgets`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["HALF_DTYPES", "MIN_NONZERO", "REPRESENTABLE_SHARE", "SPREAD_BITS", "SAMPLE_ENTRIES", "gradient_compute_eps",
           "sample_stride", "significant_bit_budgets", "summed_bits", "within_budgets"]

#: the half-precision dtypes a forward pass may compute in, coarsest first, with their machine epsilons
HALF_DTYPES: tuple[tuple[str, float], ...] = (("bfloat16", 2.0 ** -7), ("float16", 2.0 ** -10))
#: the share of the gradient's nonzero entries within a half dtype's budget of significant bits (for one gradient:
#: exactly representable in it) from which on the forward pass is taken to have computed in it
REPRESENTABLE_SHARE = 0.5
#: fewer nonzero gradient entries than this tell nothing (small integers are representable in any dtype)
MIN_NONZERO = 64
#: the significant bits an average of half-precision values may have beyond ``ceil(log2 n)`` for its ``n`` terms,
#: from the spread of their exponents. Measured (``python -m benchmarks.precision_reading``: a GELU MLP and the
#: benchmark's byte-level LM under autocast, the batch's gradient averaged over ``n`` = 2 ... 32 equal shards):
#: with 2, bfloat16 averages of up to 16 read bfloat16 (at least 54 % of their entries within its budget; of 32,
#: 41 / 39 %: float16), float16 averages read float16 and are never taken for bfloat16 (at most 44 % within its
#: budget; the LM's average of 32 reads float32, 47 %), and float32 gradients have at most 2 % within either
#: budget; with 3, float16 averages of 2 read bfloat16 (81 / 64 %); with 1, bfloat16 averages of 16 read float16
#: (40 / 38 %)
SPREAD_BITS = 2
#: the most entries read of one gradient tensor: a larger one is read at a stride (:func:`sample_stride`), and the
#: counts above are of the entries read. The shares they are compared with sit far from :data:`REPRESENTABLE_SHARE`
#: (87-100 % against 0-2 %), which a sample of this size estimates to within a fraction of a percent; reading every
#: entry of a large model's gradient needed temporaries of 3 parameter sizes in the jitted Optax step (5M
#: parameters; XLA:CPU materialises the comparisons before it counts them)
SAMPLE_ENTRIES = 1 << 16


def sample_stride(size: int) -> int:
    """The stride at which a gradient tensor of ``size`` entries is read: every entry up to
    :data:`SAMPLE_ENTRIES`, else every ``ceil(size / SAMPLE_ENTRIES)``-th (of the flattened tensor)."""
    return max(1, -(-size // SAMPLE_ENTRIES))


def summed_bits(terms: int) -> int:
    """The significant bits an average of ``terms`` values may have beyond each value's: 0 for one value, else
    ``ceil(log2 terms) + SPREAD_BITS``."""
    return 0 if terms <= 1 else math.ceil(math.log2(terms)) + SPREAD_BITS


def significant_bit_budgets(terms: int = 1) -> tuple[int, ...]:
    """Per dtype of :data:`HALF_DTYPES`, in its order, the most significant bits a gradient entry may have to count as
    computed in that dtype: the dtype's own (8 for bfloat16, 11 for float16) plus :func:`summed_bits` of ``terms``,
    the number of gradients averaged into it (the data-parallel world size). An entry ``x`` has at most ``b``
    significant bits iff ``m * 2**b`` is an integer for ``x = m * 2**e``, ``0.5 <= |m| < 1`` (``frexp``)."""
    return tuple(round(1 - math.log2(eps)) + summed_bits(terms) for _, eps in HALF_DTYPES)


def within_budgets(values: Any, terms: int, xp: Any) -> list[Any]:
    """Per dtype of :data:`HALF_DTYPES`, in its order, a boolean array: which entries of ``values`` (a float32 or
    float64 array) are within its budget of :func:`significant_bit_budgets` for ``terms``."""
    mantissa = xp.frexp(values)[0]
    return [s == xp.round(s) for s in (mantissa * 2.0 ** b for b in significant_bit_budgets(terms))]


def gradient_compute_eps(nonzero: Any, representable: Sequence[Any], xp: Any) -> Any:
    """The machine epsilon of the coarsest of :data:`HALF_DTYPES` for which at least :data:`REPRESENTABLE_SHARE`
    of the gradient's ``nonzero`` entries (at least :data:`MIN_NONZERO` of them) are within its budget of
    significant bits, else 0. ``representable``: per dtype of :data:`HALF_DTYPES`, in its order, the count of
    nonzero entries within its budget of :func:`significant_bit_budgets` (for one gradient: exactly representable
    in the dtype)."""
    eps = nonzero * 0.0
    enough = nonzero >= MIN_NONZERO
    for (_, dtype_eps), count in reversed(list(zip(HALF_DTYPES, representable))):  # the coarsest decides last
        eps = xp.where(enough & (count >= REPRESENTABLE_SHARE * nonzero), dtype_eps, eps)
    return eps
