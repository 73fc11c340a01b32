"""``prune-heads compare-selectors``: every selector side by side (``prune_heads.selection.compare``).

Its options are ``select``'s (the same ``SelectConfig``: task, budget, confidence, compensation, policy, seed,
few-shot, data folder, verification, and the iterative and gates methods' own options) plus what only a
comparison has: which selectors, several budgets, a perplexity column."""

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
from prune_heads.selection.stage import SelectConfig

#: select's options that a comparison sets itself (the method and ranking per row; no fixed count)
_NOT_HERE = ("method", "score", "heads", "fraction")


@click.command("compare-selectors")
@click.option("--model", "model_spec", required=True, help="Model (local dir, Hub id or smollm2).")
@click.option("--scores", "scores_dir", required=True, type=click.Path(exists=True), help="Scores directory (proxy scores).")
@click_options(SelectConfig, skip=_NOT_HERE)
@click_options(CompareConfig)
@output_option("Directory for results.md/.json, the plot and every plan.")
@model_options
def compare_selectors(model_spec, scores_dir, output, overwrite, **kw):
    """Run every selector on MODEL with select's options and write a table and a plot."""
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.compare import run_comparison
    from prune_heads.selection.stage import GatesMethod, IterativeMethod

    mc = model_config(model_spec, kw)
    cfg = from_cli(CompareConfig, {k: kw.pop(k) for k in ("selectors", "budgets", "ppl_data", "ppl_limit")})
    methods = {}
    for name, cls in (("iterative", IterativeMethod), ("gates", GatesMethod)):
        own = {f.name: kw.pop(f.name) for f in _fields(cls) if f.name in kw}
        if name == "gates" and all(v is None for v in own.values()):
            continue  # no gates option: the gates selector is not run (naming it in --selectors is refused)
        methods[name] = from_cli(cls, own)  # a gates option without a target is refused here
    if kw.get("max_drop") is None and cfg.budgets:
        kw["max_drop"] = cfg.budgets[0]
    select = from_cli(SelectConfig, kw)
    check_output(output, overwrite, inputs=(scores_dir, model_spec, local_path(select.task),
                                            local_path(cfg.ppl_data), local_path(select.data)))
    check_sources(data=(cfg.ppl_data, select.data), tasks=(select.task, select.verify_task))
    rows = run_comparison(select, cfg, mc.load(), HeadScores.load(scores_dir), output, overwrite=overwrite,
                          iterative=methods.get("iterative"), gates=methods.get("gates"))
    click.echo(Path(output, "results.md").read_text())
    click.echo(f"{len(rows)} rows -> {output}")


def _fields(cls: type) -> list:
    import dataclasses

    return list(dataclasses.fields(cls))
