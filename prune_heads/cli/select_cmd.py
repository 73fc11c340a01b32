"""``prune-heads select``: a plan of heads to remove, chosen under an accuracy (or perplexity/KL) budget."""

from __future__ import annotations

import importlib
from typing import Any

import click

from prune_heads.cli.options import load_from_options, model_options

METHODS = ("static", "iterative", "gates")


def _measured(method: str) -> Any:
    """The measured selectors live in their own modules; say clearly when one is not installed."""
    from prune_heads.errors import PruneHeadsError

    module, attr = {"iterative": ("iterative", "select_iterative"), "gates": ("gates", "select_gates")}[method]
    try:
        mod = importlib.import_module(f"prune_heads.selection.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"prune_heads.selection.{module}":
            raise PruneHeadsError(f"--method {method} is not available in this installation (no prune_heads.selection.{module})") from e
        raise
    fn = getattr(mod, attr, None)
    if fn is None:
        raise PruneHeadsError(f"--method {method} is not available: prune_heads.selection.{module} has no {attr}")
    return fn


def calibration_sequences(data: str | None, scores: Any, tokenizer: Any, model: Any) -> list[list[int]]:
    """Token sequences for the measured selectors: ``--data``, else the scores file's own data spec."""
    from prune_heads.data import DataSpec, iter_documents, tokenize_documents
    from prune_heads.errors import PruneHeadsError
    from prune_heads.model.adapters import get_adapter

    recorded = (scores.meta.get("data") or {}) if scores is not None else {}
    source = data or recorded.get("source")
    if not source or source == "pre-tokenised":
        raise PruneHeadsError("this method needs calibration data: pass --data SPEC (e.g. --data wikitext2)")
    spec = DataSpec(source=source, num_samples=recorded.get("num_samples") or 64, seq_len=recorded.get("seq_len") or 256,
                    seed=recorded.get("seed") or 0)
    ctx = getattr(get_adapter(model).text_config(model.config), "max_position_embeddings", None)
    return tokenize_documents(iter_documents(source), tokenizer, spec, ctx)


@click.command()
@click.argument("scores_dir", metavar="SCORES")
@click.option("--model", "model_spec", required=True, help="Model the scores were computed on (path, Hub id or smollm2).")
@click.option("--score", "score_id", default=None, help="Ranking score (static: default ahon_ln; 'random' for a random ranking; iterative: default ablation_kl).")
@click.option("--task", required=True, help="Budget task: lm-eval name (arc_easy, hellaswag, mmlu, ...), mc:FILE.jsonl, ppl:DATA or kl:DATA.")
@click.option("--max-drop", default=None, type=float, help="Allowed loss: 0.01 = one accuracy point (or a fraction with --relative); required except for gates.")
@click.option("--relative", is_flag=True, help="--max-drop is a fraction of the baseline value.")
@click.option("--limit", default=None, type=int, help="Documents of the search split to evaluate.")
@click.option("--num-fewshot", default=None, type=int)
@click.option("--verify-task", default=None, help="Task to verify on (default: the held-out split of --task).")
@click.option("--verify-limit", default=None, type=int, help="Documents to verify on (default: --limit).")
@click.option("--no-verify", is_flag=True, help="Skip the held-out verification.")
@click.option("--gqa", "policy", type=click.Choice(["free", "kv-groups", "uniform"]), default="free", show_default=True)
@click.option("--min-heads-per-layer", default=1, show_default=True, type=int)
@click.option("--allow-empty-layers", is_flag=True, help="Let a layer lose every head.")
@click.option("--method", type=click.Choice(METHODS), default="static", show_default=True)
@click.option("--data", "data_spec", default=None, help="Calibration data for iterative/gates (default: the scores file's data).")
@click.option("--round-size", default=4, show_default=True, type=int, help="iterative: heads removed per round.")
@click.option("--target-fraction", default=None, type=float, help="gates: fraction of heads to remove.")
@click.option("--data-dir", default=None, help="Folder of offline task data (default: found automatically).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the search/verify split and of --score random.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Plan file (JSON) to write.")
@click.option("--overwrite", is_flag=True)
@model_options
def select(scores_dir, model_spec, score_id, task, max_drop, relative, limit, num_fewshot, verify_task, verify_limit,
           no_verify, policy, min_heads_per_layer, allow_empty_layers, method, data_spec, round_size, target_fraction,
           data_dir, batch_size, seed, output, overwrite, **load_kw):
    """Choose heads to remove from MODEL using the scores in SCORES, keeping TASK within --max-drop."""
    from pathlib import Path

    from prune_heads.errors import OutputExistsError, PruneHeadsError
    from prune_heads.evaluation import make_evaluator
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.scoring.score_defs import validate_score_ids
    from prune_heads.selection import RANDOM_SCORE

    if Path(output).exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    if method == "static":
        score_id = score_id or "ahon_ln"
    elif method == "iterative":
        score_id = score_id or "ablation_kl"
    if score_id and score_id != RANDOM_SCORE:
        validate_score_ids([score_id])
    if max_drop is None and method != "gates":
        raise PruneHeadsError(f"--method {method} needs a budget: pass --max-drop (0.01 = one accuracy point)")
    if max_drop is not None and max_drop < 0:
        raise PruneHeadsError(f"--max-drop must be >= 0, got {max_drop}: even the unpruned model (k = 0) fails it")
    scores = HeadScores.load(scores_dir)
    loaded = load_from_options(model_spec, **load_kw)
    model, tok = loaded.model, loaded.tokenizer
    scores.check(model)

    def evaluator_for(split: str, t: str, lim: int | None) -> Any:
        return make_evaluator(model, tok, t, limit=lim, num_fewshot=num_fewshot, split=split, data_dir=data_dir,
                              batch_size=batch_size, seed=seed)

    if verify_task and verify_task != task:  # another task: disjoint by construction
        search_ev = evaluator_for("all", task, limit)
        verify_ev = None if no_verify else evaluator_for("all", verify_task, verify_limit or limit)
    else:
        search_ev = evaluator_for("search", task, limit)
        verify_ev = None if no_verify else evaluator_for("verify", task, verify_limit or limit)

    common = dict(min_heads_per_layer=min_heads_per_layer, allow_empty_layers=allow_empty_layers)
    if method == "static":
        from prune_heads.selection import select_static

        plan = select_static(model, scores, search_ev, score_id=score_id, max_drop=max_drop, relative=relative,
                             policy=policy, verify_evaluator=verify_ev, seed=seed, **common)
    else:
        fn = _measured(method)
        seqs = calibration_sequences(data_spec, scores, tok, model)
        pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else 0
        if method == "iterative":
            plan = fn(model, seqs, search_ev, max_drop=max_drop, relative=relative, round_size=round_size,
                      score_id=score_id, policy=policy, verify_evaluator=verify_ev, batch_size=batch_size,
                      pad_id=pad_id, **common)
        else:
            plan = fn(model, seqs, target_fraction=target_fraction, batch_size=min(batch_size, 4), pad_id=pad_id,
                      evaluator=search_ev, **common)
    plan.selection.model = model_spec
    plan.save(output, overwrite=overwrite)
    m = plan.to_dict()
    msg = f"{method}: removing {len(plan.removed_heads)} of {m.get('heads_total', '?')} heads"
    base, res = m.get("baseline"), m.get("result")
    if base and res:
        msg += f"; {base['metric']} {base['value']:.4f} -> {res['value']:.4f} on the search split"
    ver = m.get("verification")
    if ver:
        msg += (f"; held out {ver['baseline']['value']:.4f} -> {ver['result']['value']:.4f}"
                f" ({'within' if ver['within_budget'] else 'OUTSIDE'} budget)")
    msg += f"; {m['cost']['evaluations']} evaluations"
    click.echo(f"{msg} -> {output}")
