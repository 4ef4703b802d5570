"""Upgrades of legacy NetParameter / SolverParameter forms to the current format
(Caffe's upgrade_proto): V0/V1 `layers`, deprecated fields, solver_type."""


def upgrade_net_param(param, source="<net>"):
    """Return `param` in the current format (a copy only when something changed)."""
    if len(param.layers):
        raise ValueError(
            f"{source}: V1 'layers' format is not supported yet; upgrade it with Caffe's "
            "upgrade_net_proto_text"
        )
    return param
