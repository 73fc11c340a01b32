"""``push``: every file reaches a (fake, local) Hub byte for byte, and failures say what to do, fast."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_hub import FakeHub
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.export.model_card import write_model_card
from prune_heads.publish.hub import check_export_folder, push

TOKEN = "hf_test_token"


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online mode for huggingface_hub, and no token from the environment or a saved login."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    token_path = tmp_path / "hf_home" / "token"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_path))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(token_path.parent / "stored_tokens"))
    return token_path


@pytest.fixture
def hub():
    with FakeHub(tokens={TOKEN}) as h:
        yield h


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A folder shaped like an export: sharded safetensors + index, config, card, provenance, odd files."""
    out = tmp_path_factory.mktemp("export") / "out"
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    model.save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    write_model_card(out, {"base_model": "org/tiny", "format": "sliced", "heads_total": 8, "heads_removed": 2,
                           "removed_per_layer": [1, 1], "num_heads_per_layer": 4, "trust_remote_code": True})
    (out / "remote").mkdir()
    (out / "remote" / "modeling_pruned.py").write_text("# modelling code\n")
    (out / "empty.txt").write_bytes(b"")
    (out / "blob.bin").write_bytes(bytes(range(256)) * 7)
    _record_files(out)
    # what must never leave the machine: secrets, git metadata, and files the export did not write
    (out / ".env").write_text("HF_TOKEN=hf_secret\n")
    (out / ".git").mkdir()
    (out / ".git" / "config").write_text("[core]\n")
    (out / "notes.txt").write_text("my notes\n")
    return out


STRAYS = {".env", ".git/config", "notes.txt"}
VERIFIED = {"max_abs_logit_diff": 1e-7, "tolerance": 1e-4, "passed": True}


def _record_files(out: Path, **extra) -> None:
    """prune_heads.json as export writes it: the files with their content hashes, and a passed verification."""
    from prune_heads.io_utils import file_record

    own = {p.relative_to(out).as_posix(): None if p.name == "README.md" else file_record(p)
           for p in out.rglob("*") if p.is_file() and p.name != "prune_heads.json"
           and p.relative_to(out).as_posix() not in STRAYS}
    own["prune_heads.json"] = None  # written last, lists itself without a record
    (out / "prune_heads.json").write_text(json.dumps({"source": {"model": "org/tiny", "hub_id": "org/tiny"}, "heads_removed": 2, "files": own,
                                                      "verification": VERIFIED, **extra}))


def _local_files(folder: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip}


def _own_files(folder: Path) -> dict[str, str]:
    return _local_files(folder, STRAYS)


def _remote_files(hub: FakeHub, repo_id: str, branch: str = "main") -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in hub.files(repo_id, branch).items()}


# ---- delivery ------------------------------------------------------------------------------------
@pytest.mark.parametrize("xet", [True, False], ids=["pipelined-upload", "single-commit"])
def test_push_delivers_every_file_intact(hub_env, hub, export_dir, monkeypatch, xet):
    """Both upload paths of huggingface_hub (with and without hf_xet installed) deliver every byte."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)  # read at call time, after huggingface_hub was imported
    url = push(export_dir, "tester/tiny-pruned", token=TOKEN, private=True)
    assert url == f"{hub.endpoint}/tester/tiny-pruned"
    local = _own_files(export_dir)
    assert len(local) >= 8
    assert _remote_files(hub, "tester/tiny-pruned") == local  # every own file, byte for byte, and nothing else
    repo = hub.repos["tester/tiny-pruned"]
    assert repo.private
    # the card's front matter passed the Hub's metadata check
    assert hub.validated and set(hub.validated) == {(export_dir / "README.md").read_text()}
    assert repo.commits[-1]["summary"] == "Upload org/tiny with 2 attention heads removed (prune-heads)"


def test_push_again_and_to_a_new_branch(hub_env, hub, export_dir, tmp_path):
    hub_env.parent.mkdir(parents=True)
    hub_env.write_text(TOKEN)  # the saved `hf auth login`
    push(export_dir, "tester/tiny", endpoint=hub.endpoint)
    assert "visibility" not in hub.created[0] and not hub.repos["tester/tiny"].private  # namespace default
    # second push: the repo exists (exist_ok), the branch does not yet and is created from main
    changed = tmp_path / "changed"
    import shutil

    shutil.copytree(export_dir, changed)
    (changed / "blob.bin").write_bytes(bytes(range(255, -1, -1)) * 7)  # same size, new content: re-exported
    _record_files(changed)
    push(changed, "tester/tiny", endpoint=hub.endpoint, revision="heads-v2", commit_message="second")
    assert _remote_files(hub, "tester/tiny", "heads-v2") == _own_files(changed)
    assert _remote_files(hub, "tester/tiny", "main") == _own_files(export_dir)  # main untouched
    assert hub.repos["tester/tiny"].commits[-1]["summary"] == "second"
    # pushing to an existing branch again works too
    push(changed, "tester/tiny", endpoint=hub.endpoint, revision="heads-v2")
    assert ("POST", "/api/models/tester/tiny/branch/heads-v2") in hub.requests


def test_token_from_hf_token_env(hub_env, hub, export_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(export_dir, "tester/env-token", endpoint=hub.endpoint)
    assert _remote_files(hub, "tester/env-token") == _own_files(export_dir)


def test_export_then_push(hub_env, hub, tmp_path):
    """A real `export` output (sliced, with remote code and card) goes up whole, and its card passes the
    Hub's metadata check."""
    import warnings

    from prune_heads.export import export_checkpoint as export
    from prune_heads.plan import Plan

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("qwen2", layers=2, heads=4, kv_heads=2, head_dim=8).save_pretrained(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hand-written plan: no fingerprint
        export(str(src), Plan([(0, 1), (1, 2), (1, 3)], {"score_id": "ahon_ln"}), out, progress=False)
    url = push(out, "tester/exported", token=TOKEN, endpoint=hub.endpoint)
    assert url.endswith("/tester/exported")
    assert _remote_files(hub, "tester/exported") == _local_files(out)
    assert {"config.json", "README.md", "prune_heads.json"} <= set(hub.files("tester/exported"))
    assert hub.validated and "3 of 8" in hub.validated[0]
    assert hub.repos["tester/exported"].commits[-1]["summary"].endswith("with 3 attention heads removed (prune-heads)")


# ---- clear, fast failures ------------------------------------------------------------------------
def test_missing_token(hub_env, hub, export_dir):
    t0 = time.monotonic()
    with pytest.raises(PruneHeadsError, match=r"no Hugging Face token.*--token.*HF_TOKEN.*hf auth login"):
        push(export_dir, "tester/x", endpoint=hub.endpoint)
    assert time.monotonic() - t0 < 5
    assert hub.requests == []  # nothing was sent


def test_rejected_token(hub_env, hub, export_dir):
    with pytest.raises(PruneHeadsError, match="rejected the token"):
        push(export_dir, "tester/x", endpoint=hub.endpoint, token="hf_wrong")
    assert hub.repos == {}


def test_unreachable_hub(hub_env, export_dir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(PruneHeadsError, match=rf"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}.*HF_ENDPOINT"):
        push(export_dir, "tester/x", endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    assert time.monotonic() - t0 < 5


def test_forbidden_namespace(hub_env, hub, export_dir):
    with pytest.raises(PruneHeadsError, match="may not write to someone-else/x.*write access"):
        push(export_dir, "someone-else/x", endpoint=hub.endpoint, token=TOKEN)


def test_offline_mode(hub_env, hub, export_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PruneHeadsError, match="unset HF_HUB_OFFLINE"):
        push(export_dir, "tester/x", endpoint=hub.endpoint, token=TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad name", "org/x--y"])
def test_invalid_repo_id(hub_env, hub, export_dir, repo_id):
    with pytest.raises(PruneHeadsError, match="invalid repository id"):
        push(export_dir, repo_id, endpoint=hub.endpoint, token=TOKEN)
    assert hub.requests == []  # refused before anything was sent


def _truncate(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    listed = json.loads((folder / "prune_heads.json").read_text())
    listed["files"][shard.name] = {"size": len(data) - 10}  # even when the list agrees, the header does not
    (folder / "prune_heads.json").write_text(json.dumps(listed))


def _edit_list(folder: Path, change) -> None:
    info = json.loads((folder / "prune_heads.json").read_text())
    change(info["files"])
    (folder / "prune_heads.json").write_text(json.dumps(info))


def _edit_provenance(folder: Path, change) -> None:
    info = json.loads((folder / "prune_heads.json").read_text())
    change(info)
    (folder / "prune_heads.json").write_text(json.dumps(info))


def _nan_shard(folder: Path) -> None:
    """Every tensor of the first shard replaced by NaN, in place: same header, same size."""
    import torch
    from safetensors.torch import load_file, save_file

    shard = sorted(folder.glob("*.safetensors"))[0]
    size = shard.stat().st_size
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(shard).items()}
    save_file(tensors, shard, metadata={"format": "pt"})
    assert shard.stat().st_size == size


def _drop_tensor_from_index(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    size = (folder / "model.safetensors.index.json").stat().st_size
    _edit_list(folder, lambda files: files.update({"model.safetensors.index.json": {"size": size}}))


BREAKAGES = {  # what a careless or hostile user may hand to push -> what it says
    "missing_dir": (None, "is not a directory"),
    "junk_with_env": (lambda f: [p.unlink() for p in f.glob("*") if p.is_file() and p.name != ".env"],
                      "no prune_heads.json.*only complete prune-heads exports"),
    "no_provenance": (lambda f: (f / "prune_heads.json").unlink(), "no prune_heads.json"),
    "bad_provenance": (lambda f: (f / "prune_heads.json").write_text("{not json"), "prune_heads.json is not valid JSON"),
    "no_config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "bad_config": (lambda f: (f / "config.json").write_text("[1, 2"), "config.json is not valid JSON"),
    "no_weights": (lambda f: [p.unlink() for p in f.glob("*.safetensors")], "listed in prune_heads.json are missing"),
    "missing_shard": (lambda f: sorted(f.glob("*.safetensors"))[-1].unlink(), "missing"),
    "truncated_shard": (_truncate, "is truncated"),
    "garbage_shard": (lambda f: sorted(f.glob("*.safetensors"))[0].write_bytes(b"\xff" * 4000), "changed size|not a complete"),
    "index_lists_absent_tensor": (_drop_tensor_from_index, "lacks tensors its index lists"),
    "listed_file_missing": (lambda f: (f / "blob.bin").unlink(), "blob.bin listed in prune_heads.json are missing"),
    "listed_size_changed": (lambda f: (f / "blob.bin").write_bytes(b"x"), "blob.bin changed size"),
    "list_escapes_folder": (lambda f: _edit_list(f, lambda files: files.update({"../secret": None})), "not a plain file"),
    "list_names_dotfile": (lambda f: _edit_list(f, lambda files: files.update({".env": None})), "not a plain file"),
    "list_not_a_list": (lambda f: _edit_list(f, lambda files: files.clear() or files.update({"x": {"size": "a"}})),
                        "listed in prune_heads.json are missing"),
    # issue 21 class 4: content, not size; a file list; verification
    "same_size_edit": (lambda f: (f / "blob.bin").write_bytes(bytes(range(255, -1, -1)) * 7),
                       "blob.bin changed since the export wrote it"),
    "nan_shard_same_size": (lambda f: _nan_shard(f), "changed since the export wrote it"),
    "no_file_list": (lambda f: _edit_provenance(f, lambda p: p.pop("files")), "does not list the export's files"),
    "sizes_only_list": (lambda f: _edit_list(f, lambda files: files.update({k: (v or {}).get("size") for k, v in
                                                                            files.items()})),
                        "no content hash.*--allow-unverified"),
    "not_verified": (lambda f: _edit_provenance(f, lambda p: p.pop("verification")),
                     "not a verified export: it was exported without verification.*--allow-unverified"),
    "verification_failed": (lambda f: _edit_provenance(f, lambda p: p.update(verification={
        "max_abs_logit_diff": 3.5, "tolerance": 1e-4, "passed": False})), "its verification failed.*--allow-unverified"),
    "shard_not_own": (lambda f: _edit_list(f, lambda files: files.pop(sorted(k for k in files if k.endswith(".safetensors"))[-1])),
                      "missing \\(or not the export's own files\\)"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_refuses_folders_that_are_not_complete_exports(hub_env, hub, export_dir, tmp_path, breakage):
    import shutil

    change, message = BREAKAGES[breakage]
    folder = tmp_path / "f"
    if change is not None:
        shutil.copytree(export_dir, folder)
        change(folder)
    with pytest.raises(PruneHeadsError, match=message):
        push(folder, "tester/x", endpoint=hub.endpoint, token=TOKEN)
    assert hub.requests == []  # refused before anything was sent


def test_check_export_folder_lists_what_upload_folder_sends(export_dir):
    info = check_export_folder(export_dir)
    assert info.listed and {p.as_posix() for p in info.files} == set(_own_files(export_dir))
    assert {p.as_posix() for p in info.skipped} == STRAYS
    assert info.num_bytes == sum((export_dir / p).stat().st_size for p in info.files)


def test_push_says_what_it_skipped(hub_env, hub, export_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="prune_heads.publish.hub"):
        push(export_dir, "tester/skips", token=TOKEN, endpoint=hub.endpoint)
    assert "not uploading 3 file(s) that the export did not write" in caplog.text
    assert all(s in caplog.text for s in STRAYS)
    remote = set(hub.files("tester/skips"))
    assert not remote & STRAYS and not any(name.startswith(".") for name in remote)


def test_unlisted_export_is_refused_and_strays_never_go_up(hub_env, hub, tmp_path):
    """An export that does not list its files (an older version, or edited): which files are its own cannot be
    told, so nothing is sent (before, stray model-* and tokenizer* files went up with it)."""
    import warnings

    from prune_heads.export import export_checkpoint as export
    from prune_heads.plan import Plan

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", layers=2).save_pretrained(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(str(src), Plan([(0, 1)]), out, progress=False, verify_num_sequences=1, verify_seq_len=8)
    (out / "model-00002-of-00002.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (out / "tokenizer_extra.json").write_text("{}")
    folder = check_export_folder(out)  # listed: the strays are skipped
    assert {p.as_posix() for p in folder.skipped} == {"model-00002-of-00002.safetensors", "tokenizer_extra.json"}
    push(out, "tester/listed", token=TOKEN, endpoint=hub.endpoint)
    assert not {"model-00002-of-00002.safetensors", "tokenizer_extra.json"} & set(hub.files("tester/listed"))
    info = json.loads((out / "prune_heads.json").read_text())
    info.pop("files", None)
    (out / "prune_heads.json").write_text(json.dumps(info))
    with pytest.raises(PruneHeadsError, match="does not list the export's files"):
        push(out, "tester/old-export", token=TOKEN, endpoint=hub.endpoint)
    assert "tester/old-export" not in hub.repos


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_push(hub_env, hub, export_dir, monkeypatch):
    from prune_heads.cli.main import cli

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    r = CliRunner().invoke(cli, ["push", str(export_dir), "tester/cli", "--private", "--revision", "v1",
                                 "--token", TOKEN, "--message", "from the cli"])
    assert r.exit_code == 0, r.output
    assert f"to {hub.endpoint}/tester/cli (branch v1)" in r.output
    assert _remote_files(hub, "tester/cli", "v1") == _own_files(export_dir)
    assert hub.repos["tester/cli"].private and hub.repos["tester/cli"].commits[-1]["summary"] == "from the cli"


def test_cli_push_errors_exit_2_without_traceback(hub_env, hub, export_dir, monkeypatch):
    from prune_heads.cli.main import cli

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    r = CliRunner().invoke(cli, ["push", str(export_dir), "tester/cli"])
    assert r.exit_code == 2
    assert "no Hugging Face token" in r.output and "Traceback" not in r.output


# ---- issue 21 class 4: only verified exports, marked when allowed, no local path ---------------------------
def test_unverified_export_goes_up_only_with_the_flag_and_then_says_so(hub_env, hub, export_dir, tmp_path, monkeypatch):
    import shutil

    from prune_heads.cli.main import cli

    folder = tmp_path / "f"
    shutil.copytree(export_dir, folder)
    _edit_provenance(folder, lambda p: p.pop("verification"))  # `export --no-verify`
    before = _local_files(folder)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    r = CliRunner().invoke(cli, ["push", str(folder), "tester/unverified", "--token", TOKEN])
    assert r.exit_code == 2 and "--allow-unverified" in r.output and "Traceback" not in r.output
    assert "tester/unverified" not in hub.repos
    r = CliRunner().invoke(cli, ["push", str(folder), "tester/unverified", "--token", TOKEN, "--allow-unverified"])
    assert r.exit_code == 0, r.output
    remote = hub.files("tester/unverified")
    card = remote["README.md"].decode()
    assert "Unverified export" in card and "without verification" in card
    assert card.startswith("---") and card.index("Unverified export") > card.index("---", 3)  # after the front matter
    assert "without verification" in json.loads(remote["prune_heads.json"])["pushed_unverified"]
    assert _local_files(folder) == before  # the export itself is not touched
    others = {k for k in remote if k not in ("README.md", "prune_heads.json")}
    assert {k: hashlib.sha256(remote[k]).hexdigest() for k in others} == {k: before[k] for k in others}


def test_no_local_path_is_published(hub_env, hub, export_dir, tmp_path):
    """A ``ppl:`` task naming a file on the user's disk, a data path, a path in free text: the pushed card and
    prune_heads.json carry only the file names."""
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(export_dir, folder)
    secret = "/home/alice/private/notes-2026.txt"
    # relative specs as the user typed them, from a directory push does not run in (no file to find there)
    rel, rel_data = "ppl:alice-data/rel-notes.txt", "alice-corpus/calib.jsonl#body"
    _edit_provenance(folder, lambda p: p.update(
        evaluation=[{"task": f"ppl:{secret}", "baseline": 20.0, "pruned": 21.0},
                    {"task": rel, "baseline": 20.0, "pruned": 21.0},
                    {"task": "ppl:wikitext2", "baseline": 20.0, "pruned": 21.0},
                    {"task": "kl:hub:org/corpus?split=test", "baseline": 0.0, "pruned": 0.1}],
        scores_summary={"data": {"source": f"{secret}#text"}, "note": f"calibrated on {secret} at night",
                        "calibration": {"data": rel_data}},
        source={"model": "~/models/tiny", "hub_id": None}))
    with open(folder / "README.md", "a") as f:
        f.write(f"\n| ppl:{secret} | 20.0 | 21.0 |\n| {rel} | 20.0 | 21.0 |\n| kl:hub:org/corpus?split=test | 0 | 0.1 |\n"
                f"Data: `{secret}`; see https://huggingface.co/org/tiny\n")
    push(folder, "tester/scrubbed", token=TOKEN, endpoint=hub.endpoint)
    remote = hub.files("tester/scrubbed")
    for name in ("README.md", "prune_heads.json"):
        text = remote[name].decode()
        assert "/home/alice" not in text and "alice" not in text and "~/models" not in text, name
        assert "notes-2026.txt" in text
    assert "ppl:notes-2026.txt" in remote["README.md"].decode() and "ppl:rel-notes.txt" in remote["README.md"].decode()
    assert "kl:hub:org/corpus?split=test" in remote["README.md"].decode()  # a Hub dataset is not a local path
    assert "https://huggingface.co/org/tiny" in remote["README.md"].decode()  # URLs are not paths
    info = json.loads(remote["prune_heads.json"])
    assert info["evaluation"][0]["task"] == "ppl:notes-2026.txt" and info["source"]["model"] == "tiny"
    assert [e["task"] for e in info["evaluation"][1:]] == ["ppl:rel-notes.txt", "ppl:wikitext2",
                                                          "kl:hub:org/corpus?split=test"]
    assert info["scores_summary"]["calibration"]["data"] == "calib.jsonl#body"
    assert secret in (folder / "prune_heads.json").read_text()  # the local export is the user's: untouched
@pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
def test_cli_push_names_the_repository_in_the_card(hub_env, hub, tmp_path, monkeypatch):
    """The card's loading snippet names the repository it is pushed to, from the CLI as from `run --push`
    (both go through the push stage); the pushed record says so too."""
    from prune_heads.cli.main import cli
    from prune_heads.export import export_checkpoint
    from prune_heads.plan import Plan

    tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8).save_pretrained(tmp_path / "src")
    out = tmp_path / "export"
    export_checkpoint(str(tmp_path / "src"), Plan([(0, 1)]), out, progress=False, verify_num_sequences=1,
                      verify_seq_len=8)  # push sends verified exports only
    assert "path/to/this/model" in (out / "README.md").read_text()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    r = CliRunner().invoke(cli, ["push", str(out), "tester/named", "--token", TOKEN])
    assert r.exit_code == 0, r.output
    card = hub.files("tester/named")["README.md"].decode()
    assert 'from_pretrained("tester/named"' in card and "path/to/this/model" not in card
    assert json.loads(hub.files("tester/named")["prune_heads.json"])["repo_id"] == "tester/named"
    assert _remote_files(hub, "tester/named") == _local_files(out)  # what was pushed is what the folder holds
