"""``prune-heads run``: the whole pipeline from one recipe, resumable."""

from __future__ import annotations

import click

STAGE_NAMES = ("calibrate", "select", "export", "verify", "evaluate", "report", "push")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set select.limit=50 --set calibration.num_samples=16 (repeatable).")
@click.option("-o", "--workdir", default=None, type=click.Path(file_okay=False),
              help="Work directory (default: runs/<recipe name>). Rerunning with the same one resumes.")
@click.option("--push/--no-push", default=None, help="Push the exported model to hub.repo_id (default: the recipe's hub.push).")
@click.option("--force", is_flag=True, help="Rerun every stage even when its inputs are unchanged.")
@click.option("--stop-after", type=click.Choice(STAGE_NAMES), default=None, help="Stop once this stage is done.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run(recipe, overrides, workdir, push, force, stop_after, no_progress):
    """Calibrate, select, export, verify, evaluate (and push) as RECIPE says.

    Each stage's output is kept in WORKDIR/<stage>/ with a hash of its inputs: a rerun skips finished
    stages, continues an interrupted run, and reruns only what a changed input affects.
    """
    from prune_heads.pipeline.recipe import load_recipe
    from prune_heads.pipeline.runner import Pipeline

    r = load_recipe(recipe, list(overrides))
    wd = workdir or f"runs/{r.name}"
    summary = Pipeline(r, wd, force=force, push=push, stop_after=stop_after, progress=not no_progress,
                       echo=lambda s: click.echo(s, err=True)).run()
    click.echo("")
    click.echo(summary.to_markdown())
    if summary.complete:
        click.echo(f"summary written to {wd}/summary.md")
