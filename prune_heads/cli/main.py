"""``prune-heads`` command line. Commands live in their own modules and load lazily, so
``prune-heads --help`` stays fast and one command's imports never slow another."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from prune_heads.__about__ import __version__

#: command name -> "module:attribute" under prune_heads.cli
COMMANDS: dict[str, str] = {
    "calibrate": "calibrate_cmd:calibrate",
    "report": "report_cmd:report",
    "eval": "eval_cmd:eval_",
    "select": "select_cmd:select",
    "sweep": "sweep_cmd:sweep",
    "export": "export_cmd:export",
    "push": "push_cmd:push",
    "run": "run_cmd:run",
    "compare-selectors": "compare_cmd:compare_selectors",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            mod = importlib.import_module(f"prune_heads.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"prune_heads.cli.{module}":
                return None
            raise
        return getattr(mod, attr)

    def invoke(self, ctx: click.Context) -> Any:
        from prune_heads.errors import PruneHeadsError

        try:
            return super().invoke(ctx)
        except PruneHeadsError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prune-heads")
@click.option("-v", "--verbose", is_flag=True, help="Show library logs.")
def cli(verbose: bool) -> None:
    """Find attention heads that do no work, and remove them for real."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


if __name__ == "__main__":
    cli()
