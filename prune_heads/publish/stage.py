"""The push stage: its config (``prune-heads push`` options, the recipe's ``hub:`` section) and function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_heads.schema import Config, option


@dataclass
class PushConfig(Config):
    repo_id: str | None = option(None, cli=False, help="Hub repository to push to, e.g. you/Model-pruned")
    private: bool = option(False, help="Create the repository as private (an existing one keeps its visibility).")
    push: bool = option(False, cli=False, help="push after a successful run (CLI of run: --push/--no-push)")
    revision: str | None = option(None, help="Branch to push to; created from main if it does not exist.")
    message: str | None = option(None, short="-m", help="Commit message.")
    allow_unverified: bool = option(False, help="Push an export whose verification failed or was skipped (or that "
                                                "records no content hashes); the model card then says so.")


@dataclass
class PushResult:
    url: str
    repo_id: str
    files: int
    num_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "repo_id": self.repo_id, "files": self.files, "bytes": self.num_bytes}


def run_push(cfg: PushConfig, export_dir: Path, *, repo_id: str | None = None, token: str | None = None) -> PushResult:
    """Upload a complete export folder to ``repo_id`` (default: the config's)."""
    from prune_heads.errors import PruneHeadsError
    from prune_heads.publish.hub import check_export_folder, push

    target = repo_id or cfg.repo_id
    if not target:
        raise PruneHeadsError("no Hub repository given: set hub.repo_id in the recipe or --set hub.repo_id=NAME/REPO")
    url = push(export_dir, target, private=cfg.private, revision=cfg.revision, token=token, commit_message=cfg.message,
               allow_unverified=cfg.allow_unverified, before_upload=lambda full_id: name_repository(export_dir, full_id))
    folder = check_export_folder(export_dir, warn=False, allow_unverified=cfg.allow_unverified)
    return PushResult(url, target, len(folder.files), folder.num_bytes)


def name_repository(export_dir: Path, repo_id: str) -> None:
    """Make the model card's loading snippet name ``repo_id`` (where the export is going), re-rendering the
    card from the export's record; a folder whose record prune-heads did not write is left as it is."""
    import json

    from prune_heads.export.model_card import refresh_card
    from prune_heads.export.source import PROVENANCE_FILE

    try:
        prov = json.loads((Path(export_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return
    if isinstance(prov, dict) and prov.get("tool") == "prune-heads" and prov.get("repo_id") != repo_id:
        refresh_card(export_dir, repo_id=repo_id)
