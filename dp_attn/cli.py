"""The `dp-attn` command. Subcommands import what they need lazily, so that the
accounting commands run without loading torch or triton."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dp-attn",
        description="Differentially private training of attention models: kernels and accounting.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each subcommand registers itself here: sub.add_parser(...).set_defaults(run=function).
    del sub
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
