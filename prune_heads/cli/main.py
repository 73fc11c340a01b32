"""``prune-heads`` command line.

Commands live in their own modules and load only when run, so ``prune-heads --help`` imports no torch:
the command list is printed from the short descriptions below. Every failure a user can cause ends in one
line starting with ``error:`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from prune_heads.__about__ import __version__

#: command name -> ("module:attribute" under prune_heads.cli, one-line description for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "calibrate": ("calibrate_cmd:calibrate", "Score every head of MODEL on calibration data in one pass."),
    "report": ("report_cmd:report", "Heatmaps, distributions, thresholds and overlaps of a scores directory."),
    "eval": ("eval_cmd:eval_", "Evaluate MODEL on a task, unmasked and with heads removed."),
    "select": ("select_cmd:select", "Choose heads to remove under an accuracy, perplexity or KL budget."),
    "sweep": ("sweep_cmd:sweep", "The paper's accuracy vs % heads zeroed curves and Table 2."),
    "export": ("export_cmd:export", "Write MODEL with a plan's heads removed as a new checkpoint."),
    "push": ("push_cmd:push", "Upload an export folder to the Hugging Face Hub."),
    "run": ("run_cmd:run", "Calibrate, select, export, verify, evaluate (and push) as a recipe says."),
    "compare-selectors": ("compare_cmd:compare_selectors", "Every selector under the same budget, side by side."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target[0].split(":")
        return getattr(importlib.import_module(f"prune_heads.cli.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in sorted(COMMANDS)])

    def invoke(self, ctx: click.Context) -> Any:
        from prune_heads.errors import PruneHeadsError

        try:
            return super().invoke(ctx)
        except PruneHeadsError as e:
            _fail(str(e))
        except click.UsageError as e:
            _fail(e.format_message() + (f" (see `prune-heads {e.ctx.command_path.split(' ', 1)[-1]} --help`)"
                                        if e.ctx is not None and " " in e.ctx.command_path else ""))
        except RecursionError:  # a hostile input (JSON/YAML nested a million deep) read by a library
            _fail("an input is nested too deeply to read (a damaged or hostile JSON/YAML file?); check the files given")
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                _fail(f"no space left on the device ({e.filename or 'output'}); free some space and run again")
            if e.errno in _PATH_ERRNOS and e.filename is not None:  # a path the user gave: too long, not allowed...
                from prune_heads.errors import shown

                _fail(f"{e.strerror}: {shown(os.fsdecode(e.filename), 300)}; check the path (its length, its folders "
                      "and their permissions) and run again")
            raise


#: errors of a path the user chose, not of prune-heads: ENAMETOOLONG, EACCES, EPERM, EROFS, ELOOP, ENOTDIR, EISDIR
_PATH_ERRNOS = (36, 13, 1, 30, 40, 20, 21)


#: the longest error line printed: a message that quotes a hostile value is cut, never printed whole
MAX_ERROR_CHARS = 2000


def _fail(message: str) -> None:
    line = " ".join(message[: 4 * MAX_ERROR_CHARS].split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 20] + " ... (message cut)"
    click.secho("error: " + line, fg="red", err=True)
    sys.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prune-heads")
@click.option("-v", "--verbose", is_flag=True, help="Show library logs.")
def cli(verbose: bool) -> None:
    """Find attention heads that do no work, and remove them for real."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    """Console entry point: usage errors raised while parsing the top level also end in one line."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted")
    except click.UsageError as e:
        _fail(e.format_message())
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
