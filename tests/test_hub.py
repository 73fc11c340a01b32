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
    own = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    own["prune_heads.json"] = None  # written last, lists itself without a size
    (out / "prune_heads.json").write_text(json.dumps({"source": {"model": "org/tiny", "hub_id": "org/tiny"},
                                                      "heads_removed": 2, "files": own}))
    # what must never leave the machine: secrets, git metadata, and files the export did not write
    (out / ".env").write_text("HF_TOKEN=hf_secret\n")
    (out / ".git").mkdir()
    (out / ".git" / "config").write_text("[core]\n")
    (out / "notes.txt").write_text("my notes\n")
    return out


STRAYS = {".env", ".git/config", "notes.txt"}


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
    (changed / "blob.bin").write_bytes(bytes(range(255, -1, -1)) * 7)  # same size: the list still holds
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
    listed["files"][shard.name] = len(data) - 10  # even when the list agrees, the header does not
    (folder / "prune_heads.json").write_text(json.dumps(listed))


def _edit_list(folder: Path, change) -> None:
    info = json.loads((folder / "prune_heads.json").read_text())
    change(info["files"])
    (folder / "prune_heads.json").write_text(json.dumps(info))


def _drop_tensor_from_index(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    size = (folder / "model.safetensors.index.json").stat().st_size
    _edit_list(folder, lambda files: files.update({"model.safetensors.index.json": size}))


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


def test_unlisted_export_uploads_only_what_export_writes(hub_env, hub, tmp_path):
    """An export from a version that does not list its files: the names `export` writes go, the rest stays."""
    import warnings

    from prune_heads.export import export_checkpoint as export
    from prune_heads.plan import Plan

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama", layers=2).save_pretrained(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(str(src), Plan([(0, 1)]), out, progress=False, verify=False)
    info = json.loads((out / "prune_heads.json").read_text())
    info.pop("files", None)
    (out / "prune_heads.json").write_text(json.dumps(info))
    (out / ".env").write_text("SECRET=1")
    (out / "scratch.py").write_text("print(1)")
    folder = check_export_folder(out)
    assert not folder.listed and {p.as_posix() for p in folder.skipped} == {".env", "scratch.py"}
    push(out, "tester/old-export", token=TOKEN, endpoint=hub.endpoint)
    assert set(hub.files("tester/old-export")) == {p.as_posix() for p in folder.files}
    assert {"config.json", "prune_heads.json", "model.safetensors", "modeling_pruned.py"} <= set(hub.files("tester/old-export"))


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


@pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
def test_cli_push_names_the_repository_in_the_card(hub_env, hub, tmp_path, monkeypatch):
    """The card's loading snippet names the repository it is pushed to, from the CLI as from `run --push`
    (both go through the push stage); the pushed record says so too."""
    from prune_heads.cli.main import cli
    from prune_heads.export import export_checkpoint
    from prune_heads.plan import Plan

    tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8).save_pretrained(tmp_path / "src")
    out = tmp_path / "export"
    export_checkpoint(str(tmp_path / "src"), Plan([(0, 1)]), out, verify=False, progress=False)
    assert "path/to/this/model" in (out / "README.md").read_text()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    r = CliRunner().invoke(cli, ["push", str(out), "tester/named", "--token", TOKEN])
    assert r.exit_code == 0, r.output
    card = hub.files("tester/named")["README.md"].decode()
    assert 'from_pretrained("tester/named"' in card and "path/to/this/model" not in card
    assert json.loads(hub.files("tester/named")["prune_heads.json"])["repo_id"] == "tester/named"
    assert _remote_files(hub, "tester/named") == _local_files(out)  # what was pushed is what the folder holds
