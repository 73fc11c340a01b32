"""``prune-heads export``: the plan applied to MODEL as a new, smaller checkpoint, verified."""

from __future__ import annotations

import sys

import click

from prune_heads.cli.options import check_output, check_sources, model_config, output_option
from prune_heads.export.stage import ExportConfig, VerifyConfig
from prune_heads.model.config import ModelConfig
from prune_heads.schema import click_options


@click.command()
@click.argument("model")
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Plan JSON (removed_heads).")
@click.option("--scores", "scores_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Scores directory whose moments rebuild a compensated plan's compensation (only for plans "
                   "without their .compensation.safetensors file).")
@click_options(ExportConfig)
@click_options(VerifyConfig)
@output_option("Checkpoint directory to write.")
@click_options(ModelConfig, skip=("dtype", "device", "device_map"))
def export(model, plan_path, scores_dir, output, overwrite, **kw):
    """Write MODEL with the heads in --plan removed as a new checkpoint.

    Exits with status 1 when verification exceeds the tolerance (the checkpoint and its
    prune_heads.json are still written, so the failure can be inspected).
    """
    from prune_heads.export.stage import run_export
    from prune_heads.plan import Plan
    from prune_heads.schema import from_cli

    mc = model_config(model, kw, fields=("revision", "gguf_file", "trust_remote_code"))
    verify = from_cli(VerifyConfig, {k: kw.pop(k) for k in ("enabled", "tol", "num_sequences", "seq_len", "engine")})
    cfg = from_cli(ExportConfig, kw)
    check_output(output, overwrite, inputs=(model, plan_path, scores_dir))
    check_sources(mc, lengths=(("--verify-seq-len", verify.seq_len if verify.enabled else None),))
    plan = Plan.load(plan_path)
    result = run_export(cfg, mc, plan, output, verify=verify, overwrite=overwrite, scores=scores_dir)
    removed = 1 - result.params_after / result.params_before
    click.echo(f"{cfg.format}: {result.params_before:,} -> {result.params_after:,} parameters ({removed:.1%} removed), "
               f"{len(plan.removed_heads)} heads -> {output}")
    v = result.verification
    if v is not None:
        status = "ok" if v["passed"] else "EXCEEDED"
        click.echo(f"verification: max |logit diff| {v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']:g}, "
                   f"float64, against the {'compensated ' if result.compensated else ''}masked original) {status}")
        if not v["passed"] and v.get("approximate_norms"):
            click.echo("(expected with --approximate-norms: the measured error is recorded in prune_heads.json)")
    if not result.passed:
        sys.exit(1)
