"""``prune-heads sweep``: the paper's accuracy-vs-heads-zeroed curves and its Table 2."""

from __future__ import annotations

import click

from prune_heads.cli.options import (
    check_output,
    check_sources,
    local_path,
    model_config,
    model_options,
    output_option,
)
from prune_heads.schema import click_options
from prune_heads.selection.sweep_stage import SweepConfig


@click.command()
@click.argument("scores_dir", metavar="SCORES")
@click.option("--model", "model_spec", required=True, help="Model the scores were computed on.")
@click_options(SweepConfig)
@output_option("Directory for sweep.json/.csv, table.md/.csv and sweep.png.")
@model_options
def sweep(scores_dir, model_spec, output, overwrite, **kw):
    """Evaluate TASK with 0-30% of heads zeroed by each score (and at random); plot and tabulate it."""
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.sweep_stage import run_sweep_stage

    mc = model_config(model_spec, kw)
    cfg = from_cli(SweepConfig, kw)
    check_output(output, overwrite, inputs=(scores_dir, model_spec, local_path(cfg.task)))
    check_sources(mc, tasks=(cfg.task,))
    result = run_sweep_stage(cfg, mc.load(), HeadScores.load(scores_dir), output, model_id=model_spec,
                             overwrite=overwrite)
    click.echo(result.table_markdown())
    click.echo(f"-> {output}/sweep.png, table.md, sweep.csv")
