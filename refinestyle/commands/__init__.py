"""Subcommands of the `refinestyle` console script (see refinestyle.cli)."""
