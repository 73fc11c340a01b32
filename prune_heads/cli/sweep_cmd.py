"""``prune-heads sweep``: the paper's accuracy-vs-heads-zeroed curves and its Table 2."""

from __future__ import annotations

import click

from prune_heads.cli.options import load_from_options, model_options


def _fractions(text: str) -> list[float]:
    from prune_heads.errors import PruneHeadsError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PruneHeadsError(f"--fractions must be comma-separated numbers, got {text!r}") from None
    # accept percentages too (5,10,...) when any value is above 1
    return [v / 100 for v in values] if any(v > 1 for v in values) else values


@click.command()
@click.argument("scores_dir", metavar="SCORES")
@click.option("--model", "model_spec", required=True, help="Model the scores were computed on.")
@click.option("--task", required=True, help="lm-eval task name, mc:FILE.jsonl, ppl:DATA or kl:DATA.")
@click.option("--scores", "score_ids", default="ahon_ln,awft,lthon_ln", show_default=True,
              help="Comma-separated score ids to sweep (a random baseline is always added).")
@click.option("--dynamic", is_flag=True, help="Zero heads per input as in the paper (default: static, same heads for every input).")
@click.option("--fractions", default="0,0.05,0.10,0.15,0.20,0.25,0.30", show_default=True, help="Fractions (or percentages) of heads.")
@click.option("--random-seeds", default="0", show_default=True, help="Seeds of the random baseline ('' for none).")
@click.option("--max-drop", default=0.01, show_default=True, type=float, help="Budget of the summary table (0.01 = one point).")
@click.option("--limit", default=None, type=int)
@click.option("--num-fewshot", default=None, type=int)
@click.option("--data-dir", default=None)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("-o", "--output", required=True, type=click.Path(), help="Directory for sweep.json/.csv, table.md/.csv and sweep.png.")
@click.option("--overwrite", is_flag=True)
@model_options
def sweep(scores_dir, model_spec, task, score_ids, dynamic, fractions, random_seeds, max_drop, limit, num_fewshot,
          data_dir, batch_size, output, overwrite, **load_kw):
    """Evaluate TASK with 0-30% of heads zeroed by each score (and at random); plot and tabulate it."""
    from prune_heads.evaluation import make_evaluator
    from prune_heads.io_utils import check_output_dir
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.scoring.score_defs import validate_score_ids
    from prune_heads.selection import RANDOM_SCORE
    from prune_heads.selection.sweep import run_sweep

    check_output_dir(output, overwrite)
    ids = [s.strip() for s in score_ids.split(",") if s.strip()]
    validate_score_ids([s for s in ids if s != RANDOM_SCORE])
    seeds = [int(s) for s in random_seeds.split(",") if s.strip()]
    scores = HeadScores.load(scores_dir)
    loaded = load_from_options(model_spec, **load_kw)
    scores.check(loaded.model)
    ev = make_evaluator(loaded.model, loaded.tokenizer, task, limit=limit, num_fewshot=num_fewshot,
                        data_dir=data_dir, batch_size=batch_size)
    result = run_sweep(loaded.model, scores, ev, score_ids=ids, fractions=_fractions(fractions), dynamic=dynamic,
                       random_seeds=seeds, max_drop=max_drop)
    result.meta.update({"model": model_spec, "scores_dir": str(scores_dir)})
    result.save(output, overwrite=overwrite)
    click.echo(result.table_markdown())
    click.echo(f"-> {output}/sweep.png, table.md, sweep.csv")
