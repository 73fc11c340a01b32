"""``prune-heads push``."""

from __future__ import annotations

import click


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing one keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to; created from main if it does not exist.")
@click.option("--token", default=None,
              help="Hub token with write access (default: HF_TOKEN, then the saved `hf auth login`).")
@click.option("-m", "--message", "message", default=None, help="Commit message.")
def push(out, repo_id, private, revision, token, message):
    """Upload the export folder OUT (from `prune-heads export`) to the Hub repository REPO_ID."""
    from prune_heads.publish.hub import check_export_folder
    from prune_heads.publish.hub import push as run_push

    url = run_push(out, repo_id, private=private, revision=revision, token=token, commit_message=message)
    export = check_export_folder(out, warn=False)
    where = f" (branch {revision})" if revision else ""
    click.echo(f"pushed {len(export.files)} files ({export.num_bytes / 1e6:.1f} MB) to {url}{where}")
