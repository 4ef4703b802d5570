"""The engine's random source: one NumPy Generator, reseeded by `set_random_seed`.

Fillers, Dropout, random crops and shuffles all draw from it, so a seeded run repeats.
`get_state` / `set_state` carry its position across processes (a stage retry goes on with
the stream the failed attempt had reached).
"""

import numpy as np

_state = {"rng": np.random.default_rng()}


def set_random_seed(seed):
    _state["rng"] = np.random.default_rng(int(seed))


def rng():
    return _state["rng"]


def get_state():
    """The generator's state: a dict of plain ints and strings (JSON-serialisable)."""
    return _state["rng"].bit_generator.state


def set_state(state):
    """Go on from a state returned by get_state."""
    _state["rng"].bit_generator.state = state
