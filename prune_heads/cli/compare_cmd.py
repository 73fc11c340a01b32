"""``prune-heads compare-selectors``: every selector side by side (``prune_heads.selection.compare``)."""

from __future__ import annotations

from pathlib import Path

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
from prune_heads.selection.compare import CompareConfig


@click.command("compare-selectors")
@click.option("--model", "model_spec", required=True, help="Model (local dir, Hub id or smollm2).")
@click.option("--scores", "scores_dir", required=True, type=click.Path(exists=True), help="Scores directory (proxy scores).")
@click_options(CompareConfig)
@output_option("Directory for results.md/.json, the plot and every plan.")
@model_options
def compare_selectors(model_spec, scores_dir, output, overwrite, **kw):
    """Run every selector on MODEL under the same budget and write a table and a plot."""
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.compare import run_comparison

    mc = model_config(model_spec, kw)
    cfg = from_cli(CompareConfig, kw)
    check_output(output, overwrite, inputs=(scores_dir, model_spec, local_path(cfg.task), local_path(cfg.ppl_data),
                                               local_path(cfg.calib_data)))
    check_sources(data=(cfg.ppl_data, cfg.calib_data), tasks=(cfg.task,))
    loaded = mc.load()
    rows = run_comparison(cfg, loaded.model, loaded.tokenizer, HeadScores.load(scores_dir), output, overwrite=overwrite)
    click.echo(Path(output, "results.md").read_text())
    click.echo(f"{len(rows)} rows -> {output}")
