"""``python -m xrai``: the command line (:mod:`xrai.cli`)."""

import sys

from xrai.cli.commands import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
