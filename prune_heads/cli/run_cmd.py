"""``prune-heads run``: the whole pipeline from one recipe, resumable."""

from __future__ import annotations

import click

from prune_heads.pipeline.stages import STAGES


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set select.limit=50 --set calibration.num_samples=16 (repeatable).")
@click.option("-o", "--workdir", default=None, type=click.Path(file_okay=False),
              help="Work directory (default: runs/<recipe name>). Rerunning with the same one resumes.")
@click.option("--push/--no-push", default=None, help="Push the exported model to hub.repo_id (default: the recipe's hub.push).")
@click.option("--force", is_flag=True, help="Rerun every stage even when its inputs are unchanged.")
@click.option("--stop-after", type=click.Choice(STAGES), default=None, help="Stop once this stage is done.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run(recipe, overrides, workdir, push, force, stop_after, no_progress):
    """Calibrate, select, export, verify, evaluate (and push) as RECIPE says.

    Each stage's output is kept in WORKDIR/<stage>/ with a hash of its inputs: a rerun skips finished
    stages, continues an interrupted run, and reruns only what a changed input affects.
    """
    from prune_heads.pipeline.stages import run as run_pipeline

    summary = run_pipeline(recipe, workdir, list(overrides), force=force, push=push, stop_after=stop_after,
                           progress=not no_progress, echo=lambda s: click.echo(s, err=True))
    if summary is None:  # a helper process of a torchrun calibration: rank 0 reports
        return
    click.echo("")
    click.echo(summary.to_markdown())
    if summary.complete:
        click.echo(f"summary written to {summary.workdir}/summary.md")
