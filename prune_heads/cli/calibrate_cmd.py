"""``prune-heads calibrate``: every head of MODEL scored with every score in one pass."""

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
from prune_heads.scoring.stage import CalibrateConfig


@click.command()
@click.argument("model")
@click_options(CalibrateConfig)
@output_option("Scores directory to write.")
@model_options
def calibrate(model, output, overwrite, **kw):
    """Score every head of MODEL on calibration data in one pass and write a scores directory."""
    from prune_heads.pipeline.distributed import join_process_group
    from prune_heads.schema import from_cli
    from prune_heads.scoring.stage import run_calibrate

    mc = model_config(model, kw)
    cfg = from_cli(CalibrateConfig, kw)
    check_output(output, overwrite, inputs=(model, local_path(cfg.data)))
    check_sources(mc, lengths=(("--seq-len", cfg.seq_len),), data=(cfg.data_now(),))
    join_process_group(mc)  # under torchrun / accelerate launch each process scores every world-th sample
    from prune_heads.scoring.stage import calibrate_engine, run_calibrate_sequential

    if calibrate_engine(cfg, mc, estimate=preflight_line) == "sequential":
        res = run_calibrate_sequential(cfg, mc, model, output, overwrite=overwrite)
    else:
        res = run_calibrate(cfg, mc.load(), model, output, revision=mc.revision, overwrite=overwrite)
    if res.scores_dir is not None and res.scores is not None:
        _summary(res, output)


def _summary(res, output) -> None:
    """One line of totals, then the five most inactive heads by each of a few headline scores."""
    from prune_heads.scoring.score_defs import inactivity

    hs = res.scores
    click.echo(f"scored {hs.num_layers * hs.num_heads} heads ({hs.num_layers} layers x {hs.num_heads}) with "
               f"{len(hs.score_ids)} scores on {res.num_samples} samples / {res.num_tokens} tokens "
               f"in {res.wall_seconds}s -> {output}")
    for sid in [s for s in ("awft", "ahon_ln", "lthon_ln", "grad", "lsq_error") if s in hs.score_ids][:3] or hs.score_ids[:1]:
        flat = inactivity(hs.mean(sid), sid).flatten()
        top = flat.topk(min(5, flat.numel())).indices.tolist()
        heads = ", ".join(f"L{i // hs.num_heads}H{i % hs.num_heads}" for i in top)
        click.echo(f"  most inactive by {sid}: {heads}")
