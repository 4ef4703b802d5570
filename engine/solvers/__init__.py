"""Caffe's solvers: `get_solver(path or SolverParameter)` builds the one named by `type`
(SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam; the legacy `solver_type` enum is mapped)."""

from engine.solvers.adadelta import AdaDeltaSolver
from engine.solvers.adagrad import AdaGradSolver
from engine.solvers.adam import AdamSolver
from engine.solvers.base import (
    Solver,
    SolverError,
    get_solver,
    read_solver_param,
    register_solver,
    registered_solvers,
    upgrade_solver_param,
)
from engine.solvers.nesterov import NesterovSolver
from engine.solvers.rmsprop import RMSPropSolver
from engine.solvers.sgd import SGDSolver

__all__ = [
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "NesterovSolver",
    "RMSPropSolver",
    "SGDSolver",
    "Solver",
    "SolverError",
    "get_solver",
    "read_solver_param",
    "register_solver",
    "registered_solvers",
    "upgrade_solver_param",
]
