"""A fresh random seed per test session, so that randomized tests see new inputs on every run.

Set ``STRATAGEM_TEST_SEED`` to repeat a run: failure messages name the seed they used.
"""

from __future__ import annotations

import os
import random

SESSION_SEED = int(os.environ.get("STRATAGEM_TEST_SEED") or random.SystemRandom().randrange(10**6))


def fresh_seed(case: int) -> int:
    """The seed of one test case: distinct per case, new per session unless STRATAGEM_TEST_SEED is set."""
    return SESSION_SEED * 1000 + case


def describe(seed: int) -> str:
    return f"seed {seed}; repeat with STRATAGEM_TEST_SEED={SESSION_SEED}"
