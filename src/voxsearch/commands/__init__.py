"""One module per `voxsearch` subcommand; each exposes `register(subparsers)`.

The command line discovers the modules present here, so a stage that is not built has no command.
"""
