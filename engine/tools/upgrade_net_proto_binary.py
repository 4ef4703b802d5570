"""Rewrite a legacy-format .caffemodel (V0/V1 layers) in the current format:
`python -m engine.tools.upgrade_net_proto_binary IN OUT` (Caffe's tool of that name)."""

import sys

from engine.upgrade import tool_main


def main(argv=None):
    return tool_main(
        argv,
        "net_binary",
        "Upgrade a binary NetParameter (.caffemodel) to the current Caffe format.",
    )


if __name__ == "__main__":
    sys.exit(main())
