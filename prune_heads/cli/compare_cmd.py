"""``prune-heads compare-selectors``: every selector side by side (``prune_heads.selection.compare``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from prune_heads.cli.options import load_from_options, model_options


@click.command("compare-selectors")
@click.option("--model", "model_spec", required=True, help="Model (local dir, Hub id or smollm2).")
@click.option("--scores", "scores_dir", required=True, type=click.Path(exists=True), help="Scores directory (proxy scores).")
@click.option("--task", required=True, help="Evaluation task (lm-eval name, mc:FILE.jsonl, ppl:DATA or kl:DATA).")
@click.option("--max-drop", required=True, help="Budget(s), comma-separated (one line per selector over them).")
@click.option("--relative", is_flag=True, help="--max-drop is a fraction of the baseline.")
@click.option("--ppl-data", default=None, help="Also report perplexity on this data spec (e.g. wikitext2).")
@click.option("--limit", default=None, type=int, help="Documents per evaluation split.")
@click.option("--ppl-limit", default=None, type=int)
@click.option("--calib-data", default="wikitext2", show_default=True, help="Data the measured selectors train/measure on.")
@click.option("--calib-samples", default=8, show_default=True, type=int)
@click.option("--calib-len", default=128, show_default=True, type=int)
@click.option("--round-size", default=4, show_default=True, type=int)
@click.option("--candidates-fraction", default=None, type=float,
              help="Iterative: re-measure only this fraction of heads (least harmful at the first measurement).")
@click.option("--gates-fraction", default=0.3, show_default=True, type=float)
@click.option("--gates-steps", default=100, show_default=True, type=int)
@click.option("--selectors", default=None, help="Comma-separated subset (static:ID, random, iterative, gates).")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
@model_options
def compare_selectors(model_spec, scores_dir, task, max_drop, relative, ppl_data, limit, ppl_limit, calib_data,
                      calib_samples, calib_len, round_size, candidates_fraction, gates_fraction, gates_steps, selectors, output,
                      overwrite, **load_kw):
    """Run every selector on MODEL under the same budget and write a table and a plot."""
    from prune_heads.io_utils import check_output_dir
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.compare import run_comparison

    check_output_dir(output, overwrite)
    drops = [float(x) for x in max_drop.split(",")]
    loaded = load_from_options(model_spec, **load_kw)
    rows = run_comparison(loaded.model, loaded.tokenizer, HeadScores.load(scores_dir), task, drops, output,
                          ppl_data=ppl_data, limit=limit, ppl_limit=ppl_limit, calib_data=calib_data,
                          calib_samples=calib_samples, calib_len=calib_len, relative=relative, round_size=round_size,
                          candidates_fraction=candidates_fraction, gates_fraction=gates_fraction, gates_steps=gates_steps,
                          selectors=selectors.split(",") if selectors else None, overwrite=overwrite)
    click.echo(Path(output, "results.md").read_text())
    click.echo(json.dumps({"rows": len(rows), "output": str(output)}))
