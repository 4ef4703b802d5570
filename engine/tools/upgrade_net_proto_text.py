"""Rewrite a legacy-format net prototxt (V0/V1 layers, old fields) in the current format:
`python -m engine.tools.upgrade_net_proto_text IN OUT` (Caffe's tool of that name)."""

import sys

from engine.upgrade import tool_main


def main(argv=None):
    return tool_main(
        argv,
        "net_text",
        "Upgrade a text NetParameter (.prototxt) to the current Caffe format.",
    )


if __name__ == "__main__":
    sys.exit(main())
