"""``prune-heads select``: a plan of heads to remove, chosen under an accuracy (or perplexity/KL) budget."""

from __future__ import annotations

import click

from prune_heads.cli.options import (
    check_output,
    check_sources,
    local_path,
    model_config,
    model_options,
    output_option,
    preflight_line,
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
    from prune_heads.compensation.plans import check_plan_output
    from prune_heads.pipeline.preflight import check_context, check_passkey_fits, task_length
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.stage import plan_line, plot_search, run_select

    mc = model_config(model_spec, kw)
    cfg = from_cli(SelectConfig, kw)
    inputs = (scores_dir, model_spec, local_path(cfg.task), local_path(cfg.verify_task), local_path(cfg.guard_task),
              local_path(cfg.data))
    check_context(mc, [("--seq-len", cfg.seq_len), ("--guard-seq-len", cfg.guard_seq_len),
                       ("--task", task_length(cfg.task)), ("--verify-task", task_length(cfg.verify_task)),
                       ("--guard-task", task_length(cfg.guard_task))])
    for option_name, t in (("--task", cfg.task), ("--verify-task", cfg.verify_task), ("--guard-task", cfg.guard_task)):
        check_passkey_fits(mc, t, option_name)
    check_output(output, overwrite, inputs=inputs, kind="file")
    check_plan_output(output, overwrite, inputs)  # and the compensation file written with it
    check_sources(mc, data=(cfg.data,), tasks=(cfg.task, cfg.verify_task, *cfg.guard_tasks()))
    if plot_path:
        check_output(plot_path, overwrite, inputs=(*inputs, output), kind="file")
    scores = HeadScores.load(scores_dir)
    from prune_heads.model.sequential_engine import load_for
    from prune_heads.selection.stage import select_engine

    loaded = load_for(select_engine(cfg, mc, estimate=preflight_line), mc)
    plan = run_select(cfg, loaded, scores, output, model_id=model_spec, overwrite=overwrite)
    click.echo(plan_line(plan, output))
    if plot_path and (written := plot_search(plan, plot_path)):
        click.echo("search plots -> " + ", ".join(str(f) for f in written))
