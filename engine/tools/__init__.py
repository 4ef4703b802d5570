"""Caffe's command-line tools, one module each: `python -m engine.tools.<name>` (data tools:
convert_imageset, compute_image_mean, convert_mnist_data, convert_cifar_data, extract_features;
also upgrade_net_proto_text / upgrade_net_proto_binary / upgrade_solver_proto_text).

Flags follow gflags like Caffe's tools: `--flag=value`, `--flag value`, `-flag value`, and
for booleans `--flag`, `--flag=false`, `--noflag`. Logs go to stderr in glog's style.
"""

import argparse
import logging
import sys

_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")


def _parse_bool(text):
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


class FlagParser:
    """A small gflags-compatible parser: declare flags, then parse(argv) -> (flags, positional)."""

    def __init__(self, prog, usage, description=""):
        self.prog = prog
        self.usage = usage
        self.description = description
        self._flags = {}  # name -> (kind, default, help)

    def string(self, name, default, help):
        self._flags[name] = (str, default, help)

    def integer(self, name, default, help):
        self._flags[name] = (int, default, help)

    def boolean(self, name, default, help):
        self._flags[name] = (bool, default, help)

    def help_text(self):
        lines = [f"{self.prog}: {self.description}", f"Usage: {self.usage}", "", "Flags:"]
        for name, (kind, default, text) in self._flags.items():
            d = str(default).lower() if kind is bool else repr(default)
            lines.append(f"  --{name} ({text}) type: {kind.__name__} default: {d}")
        return "\n".join(lines)

    def parse(self, argv):
        values = {name: spec[1] for name, spec in self._flags.items()}
        positional = []
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            if arg == "--":
                positional.extend(argv[i:])
                break
            if not arg.startswith("-") or arg == "-":
                positional.append(arg)
                continue
            body = arg.lstrip("-")
            if body in ("help", "h", "helpfull"):
                print(self.help_text())
                raise SystemExit(0)
            name, eq, value = body.partition("=")
            if name not in self._flags and name.startswith("no") and name[2:] in self._flags:
                if self._flags[name[2:]][0] is bool and not eq:
                    values[name[2:]] = False
                    continue
            if name not in self._flags:
                self.fail(f"unknown command line flag '{name}'")
            kind = self._flags[name][0]
            if not eq:
                if kind is bool:
                    values[name] = True
                    continue
                if i >= len(argv):
                    self.fail(f"flag '{name}' is missing its value")
                value = argv[i]
                i += 1
            try:
                values[name] = _parse_bool(value) if kind is bool else kind(value)
            except (ValueError, argparse.ArgumentTypeError):
                self.fail(f"illegal value '{value}' for flag '{name}' ({kind.__name__})")
        return argparse.Namespace(**values), positional

    def fail(self, message):
        print(f"{self.prog}: {message}\nUsage: {self.usage}", file=sys.stderr)
        raise SystemExit(1)


class _GlogFormatter(logging.Formatter):
    def format(self, record):
        import time

        t = time.localtime(record.created)
        ms = int(record.msecs)
        stamp = time.strftime("%m%d %H:%M:%S", t)
        return f"{record.levelname[0]}{stamp}.{ms:03d} {record.name}] {record.getMessage()}"


def setup_logging(name):
    """Log INFO and above to stderr in glog's layout; returns the tool's logger."""
    root = logging.getLogger()
    if not any(getattr(h, "_engine_tool", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_GlogFormatter())
        handler._engine_tool = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return logging.getLogger(name)


def run_main(main):
    """Run a tool's main(argv); errors become a one-line message and exit status 1."""
    from engine.data.sources import DataSourceError

    try:
        return main(sys.argv[1:])
    except (DataSourceError, ValueError, OSError) as e:
        logging.getLogger("engine.tools").error("%s", e)
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
