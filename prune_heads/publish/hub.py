"""Push an exported checkpoint to the Hugging Face Hub.

Everything that can go wrong before bytes move is checked first (is this an export, is there a token, is
the Hub reachable, is the token accepted), so a push fails in seconds with a message that says what to
do, instead of after a long upload or deep inside ``huggingface_hub`` with a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError

log = logging.getLogger(__name__)

#: seconds to wait for the Hub to answer the up-front reachability / token check
PROBE_TIMEOUT = 15.0
_LOGIN_HINT = "pass --token (token=...), set HF_TOKEN, or log in once with `hf auth login`; the token needs write access"


@dataclass(frozen=True)
class ExportFolder:
    path: Path
    files: list[Path]  # relative paths that will be uploaded (the export's own files)
    num_bytes: int
    skipped: list[Path] = field(default_factory=list)  # files in the folder that are not uploaded
    listed: bool = False  # True when prune_heads.json lists the export's files (else the known export names)


PROVENANCE = "prune_heads.json"
INDEX = "model.safetensors.index.json"
_HINT = "pass the output folder of `prune-heads export MODEL --plan plan.json -o OUT`"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PruneHeadsError(f"{path} is not valid JSON ({e}); {what}") from None


def _listed_files(folder: Path, provenance: dict[str, Any]) -> dict[str, int | None] | None:
    """``{relative path: size or None}`` from prune_heads.json's ``files`` (a list, or a map to sizes)."""
    listed = provenance.get("files")
    if listed is None:
        return None
    if isinstance(listed, list):
        entries: dict[str, Any] = {str(f): None for f in listed}
    elif isinstance(listed, dict):
        entries = {str(k): (v.get("size") if isinstance(v, dict) else v) for k, v in listed.items()}
    else:
        raise PruneHeadsError(f"{folder / PROVENANCE}: 'files' must list the export's files; export again")
    for name in entries:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or any(part.startswith(".") for part in parts) or not parts:
            raise PruneHeadsError(f"{folder / PROVENANCE} lists {name!r}, which is not a plain file inside the export "
                                  "(absolute, '..' or hidden); export again")
    return entries


def _known_export_files(folder: Path) -> set[str]:
    """What `prune-heads export` writes, for exports whose prune_heads.json does not list its files."""
    from fnmatch import fnmatch

    from prune_heads.export.sliced import FAMILY_FILE, REMOTE_FILES
    from prune_heads.export.streaming import AUX_PATTERNS

    names = {PROVENANCE, "config.json", "README.md", INDEX, "model.safetensors", *REMOTE_FILES, FAMILY_FILE}
    out = set()
    for f in folder.iterdir():
        if f.is_file() and not f.name.startswith("."):
            if f.name in names or any(fnmatch(f.name, p) for p in AUX_PATTERNS) or re.fullmatch(
                    r"model-\d{5}-of-\d{5}\.safetensors", f.name):
                out.add(f.name)
    return out


def _check_weights(p: Path, own: set[str]) -> None:
    """The index's shards exist and are ours; every shard's header agrees with its size and holds the
    tensors the index assigns to it."""
    from prune_heads.model.loading import check_safetensors_file

    shards = sorted(f for f in own if f.endswith(".safetensors"))
    if not shards:
        raise PruneHeadsError(f"{p} has no weights (*.safetensors): it is not a complete model export; {_HINT}")
    names = {s: set(check_safetensors_file(p / s)) for s in shards}
    if INDEX in own or (p / INDEX).is_file():
        index = _read_json(p / INDEX, "export again")
        try:
            weight_map = dict(index["weight_map"])
        except (KeyError, TypeError, ValueError):
            raise PruneHeadsError(f"{p / INDEX} is not a valid safetensors index; export again") from None
        missing = sorted({s for s in weight_map.values() if s not in names})
        if missing:
            raise PruneHeadsError(f"{p} is incomplete: shard(s) {', '.join(missing[:3])} listed in {INDEX} are "
                                  "missing (or not the export's own files); export again")
        lacking = [t for t, s in weight_map.items() if t not in names[s]]
        if lacking:
            raise PruneHeadsError(f"shard {weight_map[lacking[0]]} lacks tensors its index lists (e.g. {lacking[0]}); "
                                  "export again")
    elif "model.safetensors" not in names:
        raise PruneHeadsError(f"{p} has shards but no {INDEX}; export again")


def check_export_folder(folder: str | os.PathLike, *, warn: bool = True) -> ExportFolder:
    """Refuse folders that are not a complete prune-heads export, before anything is sent.

    Complete means: ``prune_heads.json`` and ``config.json`` (valid JSON), every shard of the index present,
    and each safetensors header agreeing with its file size (a truncated shard is refused). Only the
    export's own files are uploaded: those ``prune_heads.json`` lists under ``files``, or, for exports
    that do not list them, the names `prune-heads export` writes. Dotfiles never; the rest is reported
    in ``skipped``.
    """
    p = Path(folder)
    if not p.is_dir():
        raise PruneHeadsError(f"{p} is not a directory: {_HINT}")
    if not (p / PROVENANCE).is_file():
        raise PruneHeadsError(f"{p} has no {PROVENANCE}, so it was not written by `prune-heads export`; only complete "
                              f"prune-heads exports are pushed: {_HINT}")
    provenance = _read_json(p / PROVENANCE, "export again")
    if not isinstance(provenance, dict):
        raise PruneHeadsError(f"{p / PROVENANCE} is not a JSON object; export again")
    if not (p / "config.json").is_file():
        raise PruneHeadsError(f"{p} has no config.json, so it is not a model export: {_HINT}")
    _read_json(p / "config.json", "export again")
    listed = _listed_files(p, provenance)
    if listed is not None:
        listed.setdefault(PROVENANCE, None)
        absent = sorted(f for f in listed if not (p / f).is_file() or (p / f).is_symlink())
        if absent:
            raise PruneHeadsError(f"{p} is incomplete: {', '.join(absent[:3])} listed in {PROVENANCE} "
                                  "are missing; export again")
        wrong = sorted(f for f, size in listed.items() if size is not None and (p / f).stat().st_size != size)
        if wrong:
            raise PruneHeadsError(f"{p}: {', '.join(wrong[:3])} changed size since the export wrote it; export again")
        own = set(listed)
    else:
        own = _known_export_files(p)
    _check_weights(p, own)
    everything = {f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file() or f.is_symlink()}
    skipped = sorted(Path(f) for f in everything - own)
    files = sorted(Path(f) for f in own)
    if warn and skipped:
        log.warning("not uploading %d file(s) that the export did not write: %s", len(skipped),
                    ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else ""))
    if warn and "README.md" not in own:
        log.warning("%s has no README.md: the Hub page will have no model card", p)
    return ExportFolder(p, files, sum((p / f).stat().st_size for f in files), skipped, listed is not None)


def _allow_pattern(rel: Path) -> str:
    """An fnmatch pattern that matches exactly this path."""
    return re.sub(r"([*?\[])", r"[\1]", rel.as_posix())


def resolve_token(token: str | None) -> str:
    """The explicit token, else ``HF_TOKEN``, else the saved login."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PruneHeadsError(f"no Hugging Face token found: {_LOGIN_HINT}")
    return found


def resolve_endpoint(endpoint: str | None) -> str:
    """``HF_ENDPOINT`` is read now, not when huggingface_hub was imported, so a later setting still counts."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def probe_hub(endpoint: str, token: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Check that the Hub answers and accepts the token; return the user name when it says.

    huggingface_hub's own client has no timeout, so an unreachable Hub would otherwise hang the push.
    """
    req = urllib.request.Request(f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read() or b"{}")
            return data.get("name") if isinstance(data, dict) else None
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise PruneHeadsError(f"the Hub at {endpoint} rejected the token (401 Unauthorized): {_LOGIN_HINT}") from None
        return None  # reachable; an endpoint without whoami is not a reason to stop
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise PruneHeadsError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({reason}): check the network connection, "
            "proxy settings (HTTPS_PROXY) and HF_ENDPOINT, then push again"
        ) from None


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub / transport exceptions into messages that say what to do."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise PruneHeadsError("offline mode is on (HF_HUB_OFFLINE=1); pushing needs the network: unset "
                              "HF_HUB_OFFLINE and try again") from None
    except HFValidationError as e:
        raise PruneHeadsError(f"invalid repository id {repo_id!r}: {e}") from None
    except ValueError as e:
        if "Invalid metadata in README.md" not in str(e):
            raise
        raise PruneHeadsError(f"the Hub rejected the model card's front matter: {e}\nFix README.md (or export "
                              "again) and push again") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            msg = f"the Hub rejected the token (401 Unauthorized): {_LOGIN_HINT}"
        elif status == 403:
            msg = (f"the token may not write to {repo_id} (403 Forbidden): use a token with write access to that "
                   "user or organisation, or push to your own namespace")
        elif status == 404:
            msg = f"{repo_id} or the target branch was not found on the Hub (404): check the repository id"
        else:
            msg = f"the Hub refused the push ({status}): {e}"
        raise PruneHeadsError(msg) from None
    except Exception as e:
        if _is_transport_error(e):
            raise PruneHeadsError(f"lost the connection to the Hub at {endpoint} ({e}): push again; files "
                                  "already uploaded are not sent twice") from None
        raise


def _is_transport_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    for name in ("httpx2", "httpx"):
        mod = sys.modules.get(name)
        if mod is not None and isinstance(e, mod.TransportError):
            return True
    return False


def _default_message(folder: Path) -> str:
    from prune_heads.export.record import ExportRecord, RecordError

    try:
        rec = ExportRecord.load(folder)
    except RecordError:
        return "Upload pruned model (prune-heads)"
    base = rec.source.get("hub_id") or rec.source.get("model")
    if not base:
        return "Upload pruned model (prune-heads)"
    from prune_heads.export.model_card import hub_base_model

    name = hub_base_model(base) or Path(str(base)).name
    return f"Upload {name} with {rec.heads_removed} attention heads removed (prune-heads)"


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
         before_upload: Any = None) -> str:
    """Create ``repo_id`` if needed (and the branch ``revision``), upload the export's own files of ``folder``
    (``check_export_folder``: skipped files are logged); return the repository URL.

    ``before_upload(full_repo_id)`` runs once every check has passed and the repository exists, just before
    the files are read for upload (the push stage names the repository in the model card there)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import validate_repo_id

    export = check_export_folder(folder)
    with _hub_errors("", repo_id):
        validate_repo_id(repo_id)
    if constants.is_offline_mode():
        raise PruneHeadsError("offline mode is on (HF_HUB_OFFLINE=1); pushing needs the network: unset "
                              "HF_HUB_OFFLINE and try again")
    token = resolve_token(token)
    endpoint = resolve_endpoint(endpoint)
    user = probe_hub(endpoint, token)
    log.info("pushing %d files (%d bytes) to %s as %s", len(export.files), export.num_bytes, repo_id, user or "?")
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(endpoint, repo_id):
        # private=None (not False) leaves a new repo at the namespace's default visibility
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        full_id = getattr(url, "repo_id", None) or repo_id
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(full_id, branch=revision, exist_ok=True, repo_type="model")
        if before_upload is not None:
            before_upload(full_id)
        api.upload_folder(folder_path=str(export.path), repo_id=full_id, repo_type="model", revision=revision,
                          allow_patterns=[_allow_pattern(f) for f in export.files],
                          commit_message=commit_message or _default_message(export.path))
    return str(url)
