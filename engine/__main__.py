"""`python -m engine <command>`: the Caffe-compatible command line tool (see engine/cli.py).

Commands: train, test, time, device_query.
"""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
