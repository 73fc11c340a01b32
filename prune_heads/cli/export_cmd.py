"""``prune-heads export``."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("model")
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Plan JSON (removed_heads).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint directory to write.")
@click.option("--format", "fmt", type=click.Choice(["sliced", "uniform", "masked"]), default="sliced", show_default=True,
              help="sliced: smaller, custom code via auto_map; uniform: stock architecture (uniform plans); masked: zeroed, same shapes.")
@click.option("--dtype", default=None, help="Write weights as float32, bfloat16 or float16 (default: as in the source).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare logits with the masked original.")
@click.option("--tolerance", default=1e-4, show_default=True, type=float, help="Largest allowed |logit difference| (float32).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--approximate-norms", is_flag=True, help="OLMo-2: drop removed heads from the q/k norm statistic (smaller, inexact).")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL's directory.")
def export(model, plan_path, output, fmt, dtype, shard_size, verify, tolerance, overwrite, approximate_norms, gguf_file):
    """Write MODEL with the heads in --plan removed as a new checkpoint.

    Exits with status 1 when verification exceeds the tolerance (the checkpoint and its
    prune_heads.json are still written, so the failure can be inspected).
    """
    from prune_heads.export import export_checkpoint as run_export
    from prune_heads.plan import Plan

    plan = Plan.load(plan_path)
    result = run_export(model, plan, output, format=fmt, dtype=dtype, shard_size=shard_size, verify=verify,
                        overwrite=overwrite, approximate_norms=approximate_norms, gguf_file=gguf_file,
                        scores_summary=plan.selection.scores,
                        verify_tol=tolerance)
    removed = 1 - result.params_after / result.params_before
    click.echo(f"{fmt}: {result.params_before:,} -> {result.params_after:,} parameters ({removed:.1%} removed), "
               f"{len(plan.removed_heads)} heads -> {output}")
    v = result.verification
    if v is not None:
        status = "ok" if v["passed"] else "EXCEEDED"
        click.echo(f"verification: max |logit diff| {v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']:g}) {status}")
        if not v["passed"] and v.get("approximate_norms"):
            click.echo("(expected with --approximate-norms: the measured error is recorded in prune_heads.json)")
    if not result.passed:
        sys.exit(1)
