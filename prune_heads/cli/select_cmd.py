"""``prune-heads select``: a plan of heads to remove, chosen under an accuracy (or perplexity/KL) budget."""

from __future__ import annotations

from typing import Any

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
from prune_heads.selection.stage import SelectConfig


@click.command()
@click.argument("scores_dir", metavar="SCORES")
@click.option("--model", "model_spec", required=True, help="Model the scores were computed on (path, Hub id or smollm2).")
@click_options(SelectConfig)
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw the search (metric against heads removed, each probe) to this PNG.")
@output_option("Plan file (JSON) to write.")
@model_options
def select(scores_dir, model_spec, plot_path, output, overwrite, **kw):
    """Choose heads to remove from MODEL using the scores in SCORES, keeping TASK within --max-drop."""
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.stage import run_select
    from prune_heads.selection.trace_plot import plot_search

    mc = model_config(model_spec, kw)
    cfg = from_cli(SelectConfig, kw)
    inputs = (scores_dir, model_spec, local_path(cfg.task), local_path(cfg.verify_task), local_path(cfg.data))
    check_output(output, overwrite, inputs=inputs, kind="file")
    check_sources(mc, data=(cfg.data,), tasks=(cfg.task, cfg.verify_task))
    if plot_path:
        check_output(plot_path, overwrite, inputs=(*inputs, output), kind="file")
    scores = HeadScores.load(scores_dir)
    plan = run_select(cfg, mc.load(), scores, output, model_id=model_spec, overwrite=overwrite)
    click.echo(plan_line(plan, output))
    if plot_path and (written := plot_search(plan, plot_path)):
        click.echo("search plots -> " + ", ".join(str(f) for f in written))


def plan_line(plan: Any, out: Any) -> str:
    """The one line ``select`` prints."""
    s = plan.selection
    fixed = getattr(s.details, "fixed", False)
    msg = f"{s.method}{' (fixed count, no budget)' if fixed else ''}: removing {len(plan.removed_heads)} of " \
          f"{s.heads_total} heads"
    if s.baseline and s.result:
        msg += f"; {s.baseline['metric']} {s.baseline['value']:.4f} -> {s.result['value']:.4f} on the search split"
    if s.compensated:
        msg += f" (compensated: {s.compensation['mode']}{', sequential' if s.compensation.get('sequential') else ''})"
    v = s.verification
    if v is not None:
        verdict = v.verdict or ("within" if v.within_budget else "OUTSIDE")
        msg += f"; held out {v.baseline['value']:.4f} -> {v.result['value']:.4f} " + \
            ("(measured)" if fixed else f"({verdict} budget)")
        if s.accepted_unverified:
            msg += ", ACCEPTED UNVERIFIED"
    if s.cost.evaluations:
        msg += f"; {s.cost.evaluations} evaluations"
    return f"{msg} -> {out}"
