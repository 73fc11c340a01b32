"""Cache keys follow the bytes of local inputs (class 3: results are never stale)."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.pipeline.signatures import SignatureCache, content_signature, hub_revision


def _edit_keeping_mtime(path, offset: int, n: int = 1) -> None:
    """Flip every bit of ``n`` bytes at ``offset`` (a real change whatever the bytes were: writing a fixed
    byte over random data is no change one time in 256), then restore the mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a careless `cp -p` / `touch -r` restore
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def _next_tick(path) -> None:
    """Wait until a change made now gets a later ctime than ``path``'s last change (timestamps advance in
    coarse ticks), so a test that trusts fresh signatures (``racy_margin_s=0``) is not at the clock's mercy."""
    probe = path.with_name(".tick-probe")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > path.stat().st_ctime_ns:
            break
        time.sleep(0.002)
    probe.unlink()


def test_file_key_changes_with_any_byte_and_only_then(tmp_path):
    f = tmp_path / "data.txt"
    f.write_bytes(os.urandom(1 << 20))
    cache = SignatureCache(racy_margin_s=0)
    k0 = cache.signature(f)
    assert k0 == hashlib.sha256(f"\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode()).hexdigest()
    assert cache.signature(f) == k0 and cache.full_hashes == 1  # unchanged: no second full read
    _next_tick(f)
    os.utime(f)  # touched: the cheap signature changes, the content key does not
    assert cache.signature(f) == k0 and cache.full_hashes == 2
    _next_tick(f)
    _edit_keeping_mtime(f, 500_000)  # one byte in the middle, same size, same mtime
    k1 = cache.signature(f)
    assert k1 != k0 and cache.full_hashes == 3


def test_an_edit_within_the_timestamp_tick_of_the_last_change_is_seen(tmp_path):
    """The case the cheap signature alone misses (CI once hit it): a touch and then an in-place edit with
    the mtime restored, both inside one ctime tick, leave size, mtime, ctime, inode and both ends as they
    were. A signature taken within the racy margin of the file's last change is not trusted, so the edit is
    still seen; once the file is older than the margin, its signature is trusted again."""
    f = tmp_path / "data.txt"
    f.write_bytes(os.urandom(1 << 20))
    cache = SignatureCache(racy_margin_s=0.5)
    k0 = cache.signature(f)
    os.utime(f)
    assert cache.signature(f) == k0
    _edit_keeping_mtime(f, 500_000)  # no wait: very likely in the same tick as the touch
    k1 = cache.signature(f)
    assert k1 != k0 and k1 == hashlib.sha256(f"\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode()).hexdigest()
    time.sleep(0.6)
    before = cache.full_hashes
    assert cache.signature(f) == k1 and cache.full_hashes == before + 1  # older than the margin: hashed once more
    assert cache.signature(f) == k1 and cache.full_hashes == before + 1  # and from then on trusted
    assert cache.entries[str(f.resolve())]["racy"] is False


def test_directory_key(tmp_path):
    d = tmp_path / "model"
    tiny_model("llama").save_pretrained(d)
    k0 = content_signature(d)
    (d / ".cache").mkdir()
    (d / ".cache" / "x").write_text("hub download metadata")
    (d / ".model.safetensors.tmp-1-0-h-abc").write_text("a temporary")
    assert content_signature(d) == k0  # hidden entries are not content
    (d / "extra.txt").write_text("x")
    assert content_signature(d) != k0
    (d / "extra.txt").unlink()
    assert content_signature(d) == k0
    (d / "config.json").rename(d / "config2.json")
    assert content_signature(d) != k0


def test_replacing_weights_at_the_same_path_is_seen(tmp_path):
    """The issue's case: new weights saved over the old model directory, same shapes, same file names."""
    d = tmp_path / "model"
    tiny_model("llama").save_pretrained(d)
    cache_file = tmp_path / "signatures.json"
    cache = SignatureCache(cache_file, racy_margin_s=0)
    k0 = cache.signature(d)
    cache.save()
    import torch

    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[3, 5] += 1.0  # one weight, deep in the file
    other.save_pretrained(d)
    fresh = SignatureCache(cache_file, racy_margin_s=0)  # the next run reads the remembered signatures
    assert fresh.signature(d) != k0
    # and an unchanged directory costs no full hash at all in the next process
    fresh.save()
    again = SignatureCache(cache_file, racy_margin_s=0)
    again.signature(d)
    assert again.full_hashes == 0


def test_stale_stage_keys_follow_model_and_data(tmp_path):
    """What the recipe runner's stage hashes do with the signature: a changed model or data file reruns
    calibrate (and so everything downstream); a touched but unchanged file keeps every stage current."""
    model, data = tmp_path / "model", tmp_path / "data.txt"
    tiny_model("qwen3").save_pretrained(model)
    data.write_text("one two three\n" * 100)
    cache = SignatureCache(tmp_path / "sig.json")

    def keys() -> dict[str, str]:
        cal = {"model": {"id": str(model), "content": cache.signature(model)},
               "data": {"path": str(data), "content": cache.signature(data)}, "num_samples": 8}
        k_cal = hashlib.sha256(json.dumps(cal, sort_keys=True).encode()).hexdigest()
        k_sel = hashlib.sha256(json.dumps({"calibrate": k_cal, "select": {"max_drop": 0.01}}).encode()).hexdigest()
        return {"calibrate": k_cal, "select": k_sel}

    k0 = keys()
    os.utime(data)
    os.utime(model / "model.safetensors")
    assert keys() == k0
    _edit_keeping_mtime(data, 10)  # within the tick of the touch: the racy margin still sees it
    k1 = keys()
    assert k1["calibrate"] != k0["calibrate"] and k1["select"] != k0["select"]
    size = (model / "model.safetensors").stat().st_size
    _edit_keeping_mtime(model / "model.safetensors", size // 2, 2)
    k2 = keys()
    assert k2["calibrate"] != k1["calibrate"]


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(PruneHeadsError, match="does not exist"):
        content_signature(tmp_path / "nope")


def test_hub_revision_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert hub_revision("org/m", "a" * 40) == "a" * 40
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--m" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("b" * 40)
    assert hub_revision("org/m") == "b" * 40
    assert hub_revision("org/other") is None
