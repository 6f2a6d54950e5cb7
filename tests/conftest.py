"""Test-wide settings.

Hypothesis: the randomized fault tests draw the same examples on every run (``derandomize``, no example
database), so ``make test`` and CI pass or fail the same way on every machine and every run. To search for new
failing sequences, run with ``HYPOTHESIS_PROFILE=explore`` (random examples, failures remembered in
``.hypothesis/``); turn what it finds into a fixed test.
"""
import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
