"""The engine's random source: one NumPy Generator, reseeded by `set_random_seed`.

Fillers, Dropout, random crops and shuffles all draw from it, so a seeded run repeats.
"""

import numpy as np

_state = {"rng": np.random.default_rng()}


def set_random_seed(seed):
    _state["rng"] = np.random.default_rng(int(seed))


def rng():
    return _state["rng"]
