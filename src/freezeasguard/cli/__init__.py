"""The freezeasguard command (main), its experiment, mask and service subcommands."""
from freezeasguard.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
