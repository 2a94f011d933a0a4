"""The `stalwart` subcommands, one module each (`stalwart plan` lives in stalwart/plan/command.py).

Every command module has the same shape: a docstring saying what the command is for, `HELP`
(its one line in `stalwart --help`), optionally `DESCRIPTION` (the paragraph atop its own
--help), `add_arguments(parser)` and `run(args) -> int`. stalwart/cli.py builds the parser
from them. A module imports only what its flags need at the top; torch, torchft and the
rest of the library are imported inside `run`, so `stalwart --help` and a bad flag stay fast.
"""
