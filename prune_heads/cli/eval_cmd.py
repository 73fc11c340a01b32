"""``prune-heads eval``: a task's metric with and without a head mask, written to results.json."""

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
from prune_heads.evaluation.stage import EvalTask, EvaluateConfig
from prune_heads.schema import click_options


@click.command("eval")
@click.argument("model")
@click.option("--plan", "plan_path", default=None, type=click.Path(exists=True, dir_okay=False), help="Plan file: remove its heads (compensated as the plan says).")
@click.option("--scores", "scores_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Scores directory (for --dynamic-fraction, a compensated plan's statistics; ppl:/kl: tasks then leave its calibration documents out).")
@click_options(EvalTask)
@click_options(EvaluateConfig)
@output_option("results.json to write.")
@model_options
def eval_(model, plan_path, scores_dir, output, overwrite, **kw):
    """Evaluate MODEL on a task, unmasked (baseline) and with heads removed by a plan or the dynamic mode."""
    from prune_heads.errors import PruneHeadsError
    from prune_heads.evaluation.stage import PrunedSide, run_evaluate
    from prune_heads.plan import Plan
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores

    mc = model_config(model, kw)
    task = from_cli(EvalTask, {k: kw.pop(k) for k in ("task", "num_fewshot", "limit", "split", "metric")})
    cfg = from_cli(EvaluateConfig, kw, tasks=[task])
    if plan_path and (cfg.dynamic or cfg.dynamic_fraction):
        raise PruneHeadsError("give at most one of --plan, --dynamic and --dynamic-fraction")
    check_output(output, overwrite, inputs=(model, plan_path, scores_dir, local_path(task.task)), kind="file")
    check_sources(tasks=(task.task,))
    side = PrunedSide(plan=Plan.load(plan_path) if plan_path else None,
                      scores=HeadScores.load(scores_dir) if scores_dir else None)
    from prune_heads.evaluation.stage import evaluate_engine
    from prune_heads.model.sequential_engine import load_for

    res = run_evaluate(cfg, load_for(evaluate_engine(cfg, mc), mc), model, side, output, overwrite=overwrite)
    t = res.tasks[0]

    def fmt(r):
        return f"{r['value']:.4f}" + (f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else "")

    line = f"{t.task['task']} {t.baseline['metric']}: baseline {fmt(t.baseline)}"
    if t.pruned is not None:
        line += f", pruned {fmt(t.pruned)} ({res.fraction_heads_zeroed:.1%} of heads removed)"
    click.echo(f"{line} -> {output}")
