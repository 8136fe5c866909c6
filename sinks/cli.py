"""`fg-sink KIND`: run a sink process that follows a training run's event stream."""

from __future__ import annotations

import argparse
import sys

# Filled in as sinks land (issue 4): name -> "module:Class".
SINK_KINDS: dict[str, str] = {}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fg-sink", description=__doc__)
    p.add_argument("kind", help="the sink to run: " + (", ".join(SINK_KINDS) or "none are available yet"))
    return p


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    if opts.kind not in SINK_KINDS:
        available = ", ".join(SINK_KINDS) or "none yet: the sinks (tb, json, textgen, tail) are not built"
        print(f"fg-sink: error: unknown sink {opts.kind!r}; available: {available}", file=sys.stderr)
        return 2
    raise AssertionError("unreachable until a sink kind is registered")


if __name__ == "__main__":
    sys.exit(main())
