"""Rewrite a solver prototxt that uses the old `solver_type` enum in the current format:
`python -m engine.tools.upgrade_solver_proto_text IN OUT` (Caffe's tool)."""

import sys

from engine.upgrade import tool_main


def main(argv=None):
    return tool_main(
        argv,
        "solver_text",
        "Upgrade a text SolverParameter (solver.prototxt) to the current Caffe format.",
    )


if __name__ == "__main__":
    sys.exit(main())
