"""The GGUF cache's size cap: least recently used folders go first, folders in use stay, races are harmless."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from domaintune.errors import UserError
from domaintune.llamacpp import cache

DAY = 86400.0


def _folder(root: Path, name: str, size: int, age_s: float) -> Path:
    """A fake cache folder holding `size` bytes, last used `age_s` seconds ago."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model-f16.gguf").write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(folder / "model-f16.gguf", (when, when))
    os.utime(folder, (when, when))
    return folder


@pytest.fixture(autouse=True)
def _fresh_in_use(monkeypatch):
    monkeypatch.setattr(cache, "_IN_USE", set())
    monkeypatch.delenv(cache.CACHE_MAX_ENV, raising=False)


def test_least_recently_used_go_first_until_under_the_cap(tmp_path, caplog):
    oldest = _folder(tmp_path, "model-a", 1000, 5 * DAY)
    older = _folder(tmp_path, "merged-b", 1000, 4 * DAY)
    used = _folder(tmp_path, "model-c", 1000, 3 * DAY)
    newest = _folder(tmp_path, "model-d", 1000, 0)
    unrelated = tmp_path / "notes"  # not a cache entry: never touched
    unrelated.mkdir()
    cache._touch(used)  # returned from the cache: now the most recently used of the old ones... and in use
    cache._IN_USE.clear()  # ...by a process that has ended: only its mtime protects it now
    os.utime(used, (time.time() - 2 * DAY, time.time() - 2 * DAY))  # used after a and b, before d
    with caplog.at_level(logging.INFO, logger="domaintune.llamacpp"):
        assert cache.evict_lru(tmp_path, keep=newest, max_bytes=2500) == (2, 2000)
    assert not oldest.exists() and not older.exists()
    assert used.exists() and newest.exists() and unrelated.exists()
    assert "evicted 2 least recently used folder(s)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-c", "model-d", "notes"]


def test_touching_a_cached_folder_makes_it_survive_an_older_one(tmp_path):
    first = _folder(tmp_path, "model-a", 1000, 5 * DAY)
    second = _folder(tmp_path, "model-b", 1000, 4 * DAY)
    assert cache._touch(first)
    cache._IN_USE.clear()
    assert cache.evict_lru(tmp_path, max_bytes=1500) == (1, 1000)
    assert first.exists() and not second.exists()


def test_just_created_in_use_and_recent_folders_are_kept_even_over_the_cap(tmp_path):
    created = _folder(tmp_path, "model-new", 5000, 3 * DAY)  # e.g. an old mtime carried by a copy
    returned = _folder(tmp_path, "merged-used", 1000, 4 * DAY)
    busy = _folder(tmp_path, "model-busy", 1000, 60)  # another process wrote here a minute ago
    old = _folder(tmp_path, "model-old", 1000, 5 * DAY)
    cache._IN_USE.add(returned.resolve())
    assert cache.evict_lru(tmp_path, keep=created, max_bytes=1) == (1, 1000)
    assert created.exists() and returned.exists() and busy.exists() and not old.exists()


def test_a_file_still_being_written_counts_as_use(tmp_path):
    folder = _folder(tmp_path, "model-a", 1000, 5 * DAY)
    (folder / ".model-q8_0.gguf.partial").write_bytes(b"y" * 10)  # the converter writing now
    size, last_used = cache.folder_usage(folder)
    assert size == 1010 and last_used > time.time() - 60
    assert cache.evict_lru(tmp_path, max_bytes=1) == (0, 0)
    assert folder.exists()


def test_folders_deleted_by_another_process_meanwhile_do_not_raise(tmp_path, monkeypatch):
    folders = [_folder(tmp_path, f"model-{i}", 1000, (5 - i) * DAY) for i in range(3)]
    real = cache.cache_entries

    def listed_then_deleted_elsewhere(root):
        entries = real(root)
        shutil.rmtree(folders[0])  # another process evicts it between our listing and our rename
        return entries

    monkeypatch.setattr(cache, "cache_entries", listed_then_deleted_elsewhere)
    assert cache.evict_lru(tmp_path, max_bytes=1500) == (1, 1000)  # folder 0 gone elsewhere; folder 1 by us
    assert [f.exists() for f in folders] == [False, False, True]
    assert cache.folder_usage(tmp_path / "model-gone") == (0, 0.0)
    assert real(tmp_path / "no-cache-yet") == []


def test_leftovers_of_a_crashed_eviction_are_removed(tmp_path):
    leftover = _folder(tmp_path, ".evicting-model-a-123-456", 1000, DAY)
    cache.evict_lru(tmp_path, max_bytes=10**9)
    assert not leftover.exists()


def test_cap_from_environment(monkeypatch):
    assert cache.cache_max_bytes() == 5 * 10**9
    monkeypatch.setenv(cache.CACHE_MAX_ENV, "0.5")
    assert cache.cache_max_bytes() == 5 * 10**8
    for bad in ("zero", "0", "-1", "inf"):
        monkeypatch.setenv(cache.CACHE_MAX_ENV, bad)
        with pytest.raises(UserError, match=f"{cache.CACHE_MAX_ENV} must be a number of GB above 0.*{bad}"):
            cache.cache_max_bytes()


def test_gguf_for_evicts_after_building_and_keeps_what_it_returns(tmp_path, monkeypatch):
    """gguf_for with the converter replaced by a fake writing 1000 bytes: old folders go, the new one stays."""
    from domaintune.llamacpp import quantize, tools

    def fake_convert(hf_dir, out, outtype):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"f" * 1000)
        return out

    monkeypatch.setattr(tools, "convert_hf", fake_convert)
    monkeypatch.setattr(quantize, "quantize", lambda f16, out, q: Path(out).write_bytes(b"q" * 500) or out)
    monkeypatch.setenv(cache.CACHE_MAX_ENV, str(2000 / 1e9))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}", encoding="utf-8")
    root = tmp_path / "cache"
    old = _folder(root, "model-old", 1000, 5 * DAY)
    older = _folder(root, "merged-older", 1000, 6 * DAY)
    built = cache.gguf_for(hf, "q8_0", root=root)
    assert built.read_bytes() == b"q" * 500 and not old.exists() and not older.exists()
    os.utime(built.parent, (time.time() - DAY, time.time() - DAY))
    assert cache.gguf_for(hf, "q8_0", root=root) == built  # a cache hit marks the folder used again
    assert built.parent.stat().st_mtime > time.time() - 60
