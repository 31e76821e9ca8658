"""The command line, ``python -m xrai COMMAND``: one parser (:mod:`xrai.cli.commands`); each command's code in a
module by stage (``data_cmds``, ``train_cmds``, ...), imported only when that command runs."""

from xrai.cli.commands import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
