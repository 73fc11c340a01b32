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
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prune_heads.errors import PruneHeadsError

log = logging.getLogger(__name__)

#: seconds to wait for the Hub to answer the up-front reachability / token check
PROBE_TIMEOUT = 15.0
_LOGIN_HINT = "pass --token (token=...), set HF_TOKEN, or log in once with `hf auth login`; the token needs write access"


@dataclass(frozen=True)
class ExportFolder:
    path: Path
    files: list[Path]  # relative paths that will be uploaded
    num_bytes: int


def check_export_folder(folder: str | os.PathLike, *, warn: bool = True) -> ExportFolder:
    """Refuse folders that are not a complete model export, before anything is sent."""
    p = Path(folder)
    hint = "pass the output folder of `prune-heads export MODEL --plan plan.json -o OUT`"
    if not p.is_dir():
        raise PruneHeadsError(f"{p} is not a directory: {hint}")
    if not (p / "config.json").is_file():
        raise PruneHeadsError(f"{p} has no config.json, so it is not a model export: {hint}")
    weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("pytorch_model*.bin"))
    if not weights:
        raise PruneHeadsError(f"{p} has no weights (*.safetensors): it is not a complete model export; {hint}")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise PruneHeadsError(f"{index} is not a valid safetensors index ({e}); export again") from e
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise PruneHeadsError(f"{p} is incomplete: shard(s) {', '.join(missing)} listed in {index.name} are "
                                  "missing; export again")
    if warn and not (p / "prune_heads.json").is_file():
        log.warning("%s has no prune_heads.json: it was not made by `prune-heads export`; pushing it as is", p)
    if warn and not (p / "README.md").is_file():
        log.warning("%s has no README.md: the Hub page will have no model card", p)
    files = sorted(f.relative_to(p) for f in p.rglob("*") if f.is_file() and not _ignored(f.relative_to(p)))
    return ExportFolder(p, files, sum((p / f).stat().st_size for f in files))


def _ignored(rel: Path) -> bool:
    """Files ``upload_folder`` leaves out by default (git metadata, the local HF cache)."""
    parts = rel.parts
    return parts[0] == ".git" or (len(parts) > 1 and parts[0] == ".cache" and parts[1] == "huggingface")


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
    try:
        info = json.loads((folder / "prune_heads.json").read_text())
        base = info.get("base_model") or info.get("source", {}).get("model")
        removed = info.get("heads_removed")
        if removed is None:
            removed = len((info.get("plan") or {}).get("removed_heads", []))
        if base:
            from prune_heads.export.model_card import hub_base_model

            name = hub_base_model(base) or Path(str(base)).name
            return f"Upload {name} with {removed} attention heads removed (prune-heads)"
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return "Upload pruned model (prune-heads)"


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Create ``repo_id`` if needed (and the branch ``revision``), upload every file of ``folder``; return the
    repository URL."""
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
        api.upload_folder(folder_path=str(export.path), repo_id=full_id, repo_type="model", revision=revision,
                          commit_message=commit_message or _default_message(export.path))
    return str(url)
