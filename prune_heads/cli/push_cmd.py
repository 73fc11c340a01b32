"""``prune-heads push``: a complete export folder uploaded to the Hub."""

from __future__ import annotations

import click

from prune_heads.publish.stage import PushConfig
from prune_heads.schema import click_options


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click_options(PushConfig)
@click.option("--token", default=None, help="Hub token with write access (default: HF_TOKEN, then the saved `hf auth login`).")
def push(out, repo_id, token, **kw):
    """Upload the export folder OUT (from `prune-heads export`) to the Hub repository REPO_ID."""
    from prune_heads.publish.stage import run_push
    from prune_heads.schema import from_cli

    cfg = from_cli(PushConfig, kw)
    res = run_push(cfg, out, repo_id=repo_id, token=token)
    where = f" (branch {cfg.revision})" if cfg.revision else ""
    click.echo(f"pushed {res.files} files ({res.num_bytes / 1e6:.1f} MB) to {res.url}{where}")
