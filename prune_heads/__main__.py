"""``python -m prune_heads``: the CLI."""

from .cli.main import cli

cli()
