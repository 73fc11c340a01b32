"""``prune-heads calibrate``."""

from __future__ import annotations

import time

import click

from prune_heads.cli.options import load_from_options, model_options


@click.command()
@click.argument("model")
@click.option("--data", "data_spec", required=True, help="wikitext2, FILE(.txt/.jsonl/.parquet), a save_to_disk folder, hub:ID?name=..&split=.., or task:NAME.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Scores directory to write.")
@click.option("--scores", default=None, help="Comma-separated score ids (default: every forward-pass score).")
@click.option("--num-samples", default=128, show_default=True, type=int)
@click.option("--seq-len", default=None, type=int, help="Tokens per sample (default: 512, or the model's context if shorter).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--block-size", default=None, type=int, help="Query block size (default: adaptive).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@model_options
def calibrate(model, data_spec, output, scores, num_samples, seq_len, batch_size, seed, block_size, overwrite, **load_kw):
    """Score every head of MODEL on calibration data in one pass and write a scores directory."""
    from prune_heads.io_utils import check_output_dir
    from prune_heads.scoring.calibrate import calibrate as run_calibrate
    from prune_heads.scoring.score_defs import validate_score_ids

    check_output_dir(output, overwrite)  # fail before the expensive part
    ids = validate_score_ids(scores.split(",")) if scores else None
    load_kw["device"] = _init_distributed(load_kw.get("device"), load_kw.get("device_map"))
    loaded = load_from_options(model, **load_kw)
    t0 = time.time()
    hs = run_calibrate(loaded.model, data_spec, tokenizer=loaded.tokenizer, scores=ids, batch_size=batch_size,
                       num_samples=num_samples, seq_len=seq_len, seed=seed, block_size=block_size,
                       model_name=model, revision=load_kw.get("revision"))
    hs.meta["wall_seconds"] = round(time.time() - t0, 2)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    hs.save(output, overwrite=overwrite)
    _summary(hs, output)


def _init_distributed(device: str | None, device_map: str | None) -> str | None:
    """Join the process group ``torchrun``/``accelerate launch`` describe in the environment.

    Each process then scores every world-th sample and rank 0 writes the gathered result. Returns the
    device this process should use (its own GPU, when there are GPUs).
    """
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and device_map is None and (device is None or device.startswith("cuda"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _summary(hs, output) -> None:
    """One line of totals, then the five most inactive heads by each of a few headline scores."""
    from prune_heads.scoring.score_defs import inactivity

    click.echo(f"scored {hs.num_layers * hs.num_heads} heads ({hs.num_layers} layers x {hs.num_heads}) with "
               f"{len(hs.score_ids)} scores on {hs.meta['num_samples']} samples / {hs.meta['num_tokens']} tokens "
               f"in {hs.meta['wall_seconds']}s -> {output}")
    for sid in [s for s in ("awft", "ahon_ln", "lthon_ln", "grad") if s in hs.score_ids][:3] or hs.score_ids[:1]:
        flat = inactivity(hs.mean(sid), sid).flatten()
        top = flat.topk(min(5, flat.numel())).indices.tolist()
        heads = ", ".join(f"L{i // hs.num_heads}H{i % hs.num_heads}" for i in top)
        click.echo(f"  most inactive by {sid}: {heads}")
