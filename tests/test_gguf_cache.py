"""The converted-GGUF cache is keyed by the file's content and the converter's version."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from prune_heads.model import loading


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_HEADS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_key_is_content_and_converter_version(tmp_path, cache, monkeypatch):
    a = tmp_path / "env-a" / "model.gguf"
    b = tmp_path / "env-b" / "elsewhere" / "model.gguf"
    a.parent.mkdir(parents=True)
    b.parent.mkdir(parents=True)
    a.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    shutil.copy(a, b)
    digest = hashlib.sha256(a.read_bytes()).hexdigest()
    assert loading._gguf_cache_key(a) == loading._gguf_cache_key(b) == f"{digest[:16]}-c{loading.CONVERTER_VERSION}"
    assert str(tmp_path) not in loading._gguf_cache_key(a)
    b.write_bytes(b"GGUF" + bytes(range(255)) * 100)
    assert loading._gguf_cache_key(b) != loading._gguf_cache_key(a)
    monkeypatch.setattr(loading, "CONVERTER_VERSION", loading.CONVERTER_VERSION + 1)
    assert loading._gguf_cache_key(a).endswith(f"-c{loading.CONVERTER_VERSION}")


def test_hash_is_remembered_until_the_file_changes(tmp_path, cache, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF one")
    first = loading.gguf_sha256(f)
    opened = []
    real_open = open

    def counting_open(path, *a, **kw):
        if str(path) == str(f):
            opened.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    assert loading.gguf_sha256(f) == first and opened == []  # remembered
    f.write_bytes(b"GGUF two, longer")
    assert loading.gguf_sha256(f) == hashlib.sha256(b"GGUF two, longer").hexdigest() and len(opened) == 1


def test_a_conversion_made_from_another_path_is_reused(tmp_path, cache):
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"GGUF same bytes")
    done = cache / "gguf" / f"m-{loading._gguf_cache_key(a)}"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert loading.gguf_to_plain(str(b.parent), b.name) == done  # no second conversion
