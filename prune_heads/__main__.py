"""``python -m prune_heads``: the CLI."""

from prune_heads.cli.main import main

main()
