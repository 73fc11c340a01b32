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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError, shown

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
    listed: bool = True  # prune_heads.json lists the export's files (an export that does not is refused)
    unverified: str | None = None  # why the export is not verified (pushed only with allow_unverified), else None


PROVENANCE = "prune_heads.json"
INDEX = "model.safetensors.index.json"
_HINT = "pass the output folder of `prune-heads export MODEL --plan plan.json -o OUT`"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PruneHeadsError(f"{path} is not valid JSON ({e}); {what}") from None


def _listed_files(folder: Path, provenance: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """``{relative path: record or None}`` from prune_heads.json's ``files`` (a map to ``{size, xxh3_128}``
    records; older exports: to sizes, or a list). An export that lists no files is refused: which of the
    folder's files are its own cannot be told, and a stray ``model-*`` or ``tokenizer*`` must never go up."""
    listed = provenance.get("files")
    if listed is None:
        raise PruneHeadsError(f"{folder / PROVENANCE} does not list the export's files (an older prune-heads wrote it, "
                              "or it was edited), so which files are the export's own cannot be told: export again")
    if isinstance(listed, list):
        entries: dict[str, Any] = {str(f): None for f in listed}
    elif isinstance(listed, dict):
        entries = {str(k): (v if isinstance(v, dict) else {"size": v} if v is not None else None)
                   for k, v in listed.items()}
    else:
        raise PruneHeadsError(f"{folder / PROVENANCE}: 'files' must list the export's files; export again")
    for name in entries:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or any(part.startswith(".") for part in parts) or not parts:
            raise PruneHeadsError(f"{folder / PROVENANCE} lists {shown(name)}, which is not a plain file inside the "
                                  "export (absolute, '..' or hidden); export again")
    return entries


#: files whose content legitimately changes after the export (later stages record results in them); the
#: pushed copies are checked otherwise (prune_heads.json is parsed, both are scrubbed of local paths)
_LIVING = ("README.md", PROVENANCE)


def _check_contents(p: Path, listed: dict[str, dict[str, Any] | None]) -> list[str]:
    """Every listed file is the one the export wrote: its recorded content hash (a same-size edit, an all-NaN
    shard, is caught). Returns the files that have no recorded hash (older exports: sizes only)."""
    from prune_heads.io_utils import FILE_HASH, file_record

    unhashed = []
    for name, rec in sorted(listed.items()):
        if name in _LIVING:
            continue
        want = (rec or {}).get(FILE_HASH)
        size = (rec or {}).get("size")
        if size is not None and (p / name).stat().st_size != size:
            raise PruneHeadsError(f"{p}: {name} changed size since the export wrote it; export again")
        if want is None:
            unhashed.append(name)
            continue
        if file_record(p / name)[FILE_HASH] != want:
            raise PruneHeadsError(f"{p}: {name} changed since the export wrote it (its content hash differs from the "
                                  f"one in {PROVENANCE}); export again")
    return unhashed


def _unverified(provenance: dict[str, Any]) -> str | None:
    """Why the export is not verified against the (compensated) masked original, or None when it is."""
    v = provenance.get("verification")
    if not isinstance(v, dict):
        return "it was exported without verification (--no-verify)"
    if v.get("passed") is True:
        return None
    if provenance.get("approximate_norms") or v.get("approximate_norms"):
        return None  # approximate by design: the measured error is recorded and shown on the card
    return (f"its verification failed (max |logit diff| {v.get('max_abs_logit_diff')} over the tolerance "
            f"{v.get('tolerance')})")


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


def check_export_folder(folder: str | os.PathLike, *, warn: bool = True, allow_unverified: bool = False
                        ) -> ExportFolder:
    """Refuse folders that are not a complete prune-heads export, before anything is sent.

    Complete means: ``prune_heads.json`` and ``config.json`` (valid JSON), every shard of the index present,
    and each safetensors header agreeing with its file size (a truncated shard is refused). Only the
    export's own files are uploaded: those ``prune_heads.json`` lists under ``files`` (an export that does not
    list them is refused), each with the content hash recorded at export. Dotfiles never; the rest is
    reported in ``skipped``. An export whose verification failed or was skipped is refused unless
    ``allow_unverified`` (the reason is then returned in ``unverified``, and ``push`` marks the card).
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
    listed.setdefault(PROVENANCE, None)
    absent = sorted(f for f in listed if not (p / f).is_file() or (p / f).is_symlink())
    if absent:
        raise PruneHeadsError(f"{p} is incomplete: {', '.join(absent[:3])} listed in {PROVENANCE} "
                              "are missing; export again")
    own = set(listed)
    _check_weights(p, own)
    reasons = []
    unhashed = _check_contents(p, listed)
    if unhashed:
        reasons.append(f"{PROVENANCE} records no content hash for {', '.join(unhashed[:3])} (an older export)")
    why = _unverified(provenance)
    if why:
        reasons.append(why)
    unverified = "; ".join(reasons) or None
    if unverified and not allow_unverified:
        raise PruneHeadsError(f"{p} is not a verified export: {unverified}. Export again (with verification), or "
                              "pass --allow-unverified to push it anyway (the model card then says so)")
    everything = {f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file() or f.is_symlink()}
    skipped = sorted(Path(f) for f in everything - own)
    files = sorted(Path(f) for f in own)
    if warn and skipped:
        log.warning("not uploading %d file(s) that the export did not write: %s", len(skipped),
                    ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else ""))
    if warn and "README.md" not in own:
        log.warning("%s has no README.md: the Hub page will have no model card", p)
    return ExportFolder(p, files, sum((p / f).stat().st_size for f in files), skipped, True, unverified)


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


UNVERIFIED_MARK = ("> **Unverified export.** This checkpoint was pushed with `--allow-unverified`: {why}. Its "
                   "outputs were not shown to match the original model with the removed heads zeroed.")


def published_copies(export: ExportFolder) -> dict[str, bytes]:
    """What is uploaded in place of the export's ``README.md`` and ``prune_heads.json``: the same files with every
    local path reduced to its last component (a ``ppl:`` task naming a file on this disk, a data path), and, for
    an export pushed with ``allow_unverified``, the reason on top of the card and in the record. The export
    folder itself is not touched (it is the input)."""
    from prune_heads.export.model_card import scrub_local_paths, scrub_text

    out: dict[str, bytes] = {}
    original = _read_json(export.path / PROVENANCE, "export again")
    prov = scrub_local_paths(original)
    if export.unverified:
        prov["pushed_unverified"] = scrub_text(export.unverified)
    if prov != original:  # otherwise the file goes up byte for byte
        out[PROVENANCE] = (json.dumps(prov, indent=2) + "\n").encode()
    if (export.path / "README.md").is_file() and Path("README.md") in export.files:
        card = (export.path / "README.md").read_text(encoding="utf-8", errors="replace")
        text = scrub_text_lines(card)
        if export.unverified:
            text = _insert_after_front_matter(text, UNVERIFIED_MARK.format(why=scrub_text(export.unverified)))
        if text != card:
            out["README.md"] = text.encode("utf-8")
    return out


def scrub_text_lines(text: str) -> str:
    """``scrub_text`` line by line (a card is long; paths never span lines)."""
    from prune_heads.export.model_card import scrub_text

    return "".join(scrub_text(line) for line in text.splitlines(keepends=True))


def _insert_after_front_matter(text: str, block: str) -> str:
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            cut = text.find("\n", end + 4)
            cut = len(text) if cut == -1 else cut + 1
            return text[:cut] + "\n" + block + "\n\n" + text[cut:]
    return block + "\n\n" + text


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
         allow_unverified: bool = False, before_upload: Any = None) -> str:
    """Create ``repo_id`` if needed (and the branch ``revision``), upload the export's own files of ``folder``
    (``check_export_folder``: only a verified export whose files still have their recorded content hashes, unless
    ``allow_unverified``; skipped files are logged; card and record scrubbed of local paths); return the URL.

    ``before_upload(full_repo_id)`` runs once every check has passed and the repository exists, just before
    the files are read for upload (the push stage names the repository in the model card there)."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.utils import validate_repo_id

    export = check_export_folder(folder, allow_unverified=allow_unverified)
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
        copies = published_copies(export)
        operations = [CommitOperationAdd(path_in_repo=f.as_posix(),
                                         path_or_fileobj=copies.get(f.as_posix(), str(export.path / f)))
                      for f in export.files]
        api.create_commit(repo_id=full_id, repo_type="model", revision=revision, operations=operations,
                          commit_message=commit_message or _default_message(export.path))
    return str(url)
