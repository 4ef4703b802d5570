"""Regenerate engine/proto/caffe_pb2.py from caffe.proto via grpc_tools.protoc.

Usage: python -m engine.proto.generate [OUT_DIR] (or python engine/proto/generate.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "caffe.proto"


def generate(out_dir: str | Path = PROTO_DIR) -> Path:
    """Compile caffe.proto into ``out_dir``; return the caffe_pb2.py path."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Relative proto path keeps the embedded descriptor name "caffe.proto",
    # so the output does not depend on where the repo is checked out.
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        PROTO_FILE,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return out_dir / "caffe_pb2.py"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = generate(argv[0]) if argv else generate()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
