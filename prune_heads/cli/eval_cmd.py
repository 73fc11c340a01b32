"""``prune-heads eval``: a task's metric on MODEL and on its pruned side (an export, a plan's mask or the
per-input mode), written to results.json."""

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
from prune_heads.evaluation.stage import EvalTask, EvaluateConfig
from prune_heads.schema import click_options


@click.command("eval")
@click.argument("model")
@click.option("--export", "export_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Export of MODEL (from `prune-heads export`): evaluate it against MODEL, speed included, and record "
                   "the results in its model card, as `prune-heads run` does.")
@click.option("--plan", "plan_path", default=None, type=click.Path(exists=True, dir_okay=False), help="Plan file: remove its heads (compensated as the plan says); with --export, the plan it was exported from.")
@click.option("--scores", "scores_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Scores directory (for --dynamic-fraction, a compensated plan's statistics; ppl:/kl: tasks then leave its calibration documents out).")
@click_options(EvalTask)
@click_options(EvaluateConfig)
@output_option("results.json to write.")
@model_options
def eval_(model, export_dir, plan_path, scores_dir, output, overwrite, **kw):
    """Evaluate MODEL on a task, unmasked (baseline) and pruned: its export (--export), a plan's heads removed
    (--plan) or the per-input mode (--dynamic)."""
    from prune_heads.errors import PruneHeadsError
    from prune_heads.evaluation.stage import PrunedSide, evaluate_engine, evaluate_export, run_evaluate
    from prune_heads.model.sequential_engine import load_for
    from prune_heads.pipeline.preflight import check_context, check_passkey_fits, task_length
    from prune_heads.plan import Plan
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores

    mc = model_config(model, kw)
    task = from_cli(EvalTask, {k: kw.pop(k) for k in ("task", "num_fewshot", "limit", "split", "metric", "seq_len", "score_last")})
    cfg = from_cli(EvaluateConfig, kw, tasks=[task])
    if (plan_path or export_dir) and (cfg.dynamic or cfg.dynamic_fraction):
        raise PruneHeadsError("give at most one of --plan (or --export), --dynamic and --dynamic-fraction")
    # lengths against the model's config and tokenizer before anything (even the output's folder) is made
    check_context(mc, [("--seq-len", task.seq_len), ("--task", task_length(task.task))])
    check_passkey_fits(mc, task.task, "--task")
    check_output(output, overwrite, inputs=(model, export_dir, plan_path, scores_dir, local_path(task.task)), kind="file")
    check_sources(mc, tasks=(task.task,))
    plan = Plan.load(plan_path) if plan_path else None
    scores = HeadScores.load(scores_dir) if scores_dir else None
    loaded = load_for(evaluate_engine(cfg, mc, estimate=preflight_line), mc)
    if export_dir:
        res = evaluate_export(cfg, loaded, model, export_dir, output, plan=plan, scores=scores, overwrite=overwrite)
    else:
        res = run_evaluate(cfg, loaded, model, PrunedSide(plan=plan, scores=scores), output, overwrite=overwrite)
    t = res.tasks[0]

    def fmt(r):
        return f"{r['value']:.4f}" + (f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else "")

    line = f"{t.task['task']} {t.baseline['metric']}: baseline {fmt(t.baseline)}"
    if t.pruned is not None:
        line += f", pruned {fmt(t.pruned)} ({res.fraction_heads_zeroed:.1%} of heads removed)"
    click.echo(f"{line} -> {output}")
    for s in (res.speed or {}).values():
        if s and "ratio" in s:
            click.echo(f"{s['mode']}: {s['tokens_per_s'][0]:.0f} -> {s['tokens_per_s'][1]:.0f} tokens/s "
                       f"(time x{s['ratio']:.2f}, FLOPs predict x{s['flops_ratio']:.2f})")
    if export_dir:
        click.echo(f"recorded in {export_dir}/README.md")
