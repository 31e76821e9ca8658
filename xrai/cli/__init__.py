"""The command line, ``python -m xrai COMMAND``: one parser (:mod:`xrai.cli.commands`), imports kept in the commands."""

from xrai.cli.commands import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
