"""``fastmt.cache.store``: the dir, manifest, lock, checksums and rebuilds both teacher caches share,
checked on a cache of one small data file made here (the two real layouts: tests/test_cache_teachers.py and
tests/test_cache_topk.py)."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from fastmt.cache import store as S


class PairCache(S.CacheStore):
    """Two float32 numbers a row in ``pairs.bin``; the smallest cache the store can hold."""

    LABEL = "pair cache"
    SUMMED = ("pairs.bin",)
    WHAT = {"source": "the source"}

    def __init__(self, path, manifest):
        super().__init__(path, manifest, manifest["rows"])
        self.pairs = np.memmap(self.path / "pairs.bin", dtype=np.float32, mode="r+", shape=(self.rows, 2))
        self.warned = []

    def _row_views(self, row):
        return (self.pairs[row],)

    def _data_files(self):
        return [self.pairs]

    def _warn_changed(self, name, row):
        self.warned.append((name, row))

    @classmethod
    def file_sizes(cls, rows):
        return {"pairs.bin": 8 * rows, **cls.bookkeeping(rows)}

    @classmethod
    def open(cls, path, source, rows):
        manifest = {"source": source, "rows": rows}
        sizes = cls.file_sizes(rows)
        with S.creation_lock(path):
            if cls.reusable(path, manifest, sizes) is None:
                cls.make_dir(path, sizes, manifest)
            return cls(path, manifest)

    def put(self, rows, values):
        rows = np.asarray(rows)
        self.pairs[rows] = values
        return self._commit(rows)


def test_a_new_dir_holds_its_files_zeroed_and_its_manifest(tmp_path):
    cache = PairCache.open(tmp_path / "c", "a", 5)
    d = tmp_path / "c"
    assert {p.name: p.stat().st_size for p in d.iterdir()} == {"pairs.bin": 40, "filled.bin": 5, "sums.bin": 20,
                                                              "manifest.json": len((d / "manifest.json").read_bytes())}
    assert json.loads((d / "manifest.json").read_text()) == {"source": "a", "rows": 5}
    assert cache.count == 0 and not cache.complete and not np.fromfile(d / "pairs.bin", dtype=np.uint8).any()
    assert (tmp_path / "c.lock").exists() and not list(d.glob(".*.tmp"))  # the lock beside it, no stray manifest


def test_rows_are_reused_as_far_as_they_were_filled(tmp_path):
    cache = PairCache.open(tmp_path / "c", "a", 4)
    assert cache.put([2, 0], [[1, 2], [3, 4]]) == 2 and cache.put([0], [[3, 4]]) == 0  # a row again is not new
    cache.flush()
    again = PairCache.open(tmp_path / "c", "a", 4)
    assert again.count == 2 and again._stored(np.array([0, 2])) and not again._stored(np.array([0, 1]))
    assert np.array_equal(again.pairs[[2, 0]], [[1, 2], [3, 4]])
    assert again.put([1, 3], [[5, 6], [7, 8]]) == 2 and again.complete
    assert np.fromfile(tmp_path / "c" / "filled.bin", dtype=np.uint8).all()  # on disk once full


def test_other_inputs_rebuild_it_naming_what_differs(tmp_path, caplog):
    PairCache.open(tmp_path / "c", "a", 3).put([0], [[1, 1]])
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        cache = PairCache.open(tmp_path / "c", "b", 3)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"pair cache {tmp_path / 'c'} was made for other inputs (the source differ): rebuilding it"]
    assert cache.count == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        PairCache.open(tmp_path / "c", "b", 4)  # a field WHAT does not name: its own name
    assert "(rows differ)" in caplog.text


def test_a_truncated_file_rebuilds_it_naming_the_file_and_sizes(tmp_path, caplog):
    PairCache.open(tmp_path / "c", "a", 3).put([0, 1], [[1, 1], [2, 2]])
    with open(tmp_path / "c" / "pairs.bin", "r+b") as f:
        f.truncate(10)
    (tmp_path / "c" / "sums.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        cache = PairCache.open(tmp_path / "c", "a", 3)
    assert (f"pair cache {tmp_path / 'c'} is damaged (pairs.bin (10 bytes, not 24), sums.bin (missing)): "
            "rebuilding it") in caplog.text
    assert cache.count == 0 and (tmp_path / "c" / "pairs.bin").stat().st_size == 24


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_an_unreadable_manifest_rebuilds_it(text, tmp_path, caplog):
    PairCache.open(tmp_path / "c", "a", 2).put([0], [[1, 1]])
    (tmp_path / "c" / "manifest.json").write_text(text)
    assert S.read_manifest(tmp_path / "c" / "manifest.json") == {}
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        cache = PairCache.open(tmp_path / "c", "a", 2)
    assert "(the source, rows differ): rebuilding it" in caplog.text and cache.count == 0


def test_a_cache_may_refuse_a_stored_manifest_of_its_own(tmp_path, caplog):
    class Strict(PairCache):
        @classmethod
        def _damaged_manifest(cls, stored):
            return [] if "made_by" in stored else ["manifest.json (no made_by)"]

    PairCache.open(tmp_path / "c", "a", 2).put([0], [[1, 1]])
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        assert Strict.open(tmp_path / "c", "a", 2).count == 0
    assert "is damaged (manifest.json (no made_by)): rebuilding it" in caplog.text


def test_bytes_changed_on_disk_read_as_missing_said_once_per_file(tmp_path):
    cache = PairCache.open(tmp_path / "c", "a", 4)
    cache.put([0, 1, 2, 3], np.arange(8, dtype=np.float32).reshape(4, 2))
    cache.flush()
    raw = np.memmap(tmp_path / "c" / "pairs.bin", dtype=np.float32, mode="r+")
    raw[2] += 1  # row 1
    raw[6] += 1  # row 3
    raw.flush()
    assert cache._stored(np.array([0, 2]))
    assert not cache._stored(np.array([0, 1, 3]))  # every changed row of the batch is found, not the first only
    assert cache.warned == [("pairs.bin", 1)] and cache.bad == {"pairs.bin": {1, 3}}
    assert cache.count == 2 and not cache.filled[1] and not cache.filled[3] and cache.filled[0]
    assert not cache._stored(np.array([1]))  # missing now, not checked again
    assert cache.put([1, 3], [[2, 3], [6, 7]]) == 2 and cache._stored(np.array([1, 3]))
    assert cache.warned == [("pairs.bin", 1)]  # said once


def test_a_flag_is_set_after_its_rows_checksums(tmp_path):
    """``_commit`` writes the checksums, then the flags: a reader that finds a flag finds the sums."""
    cache = PairCache.open(tmp_path / "c", "a", 2)
    seen = []
    real = cache._crc

    def crc(row):
        seen.append(int(cache.filled[row]))  # the flag when its checksum is taken
        return real(row)

    cache._crc = crc
    cache.put([1], [[5, 5]])
    assert seen == [0] and cache.filled[1] == 1
    assert cache.sums[1, 0] != 0


def test_the_creation_lock_is_held_by_one_opener_at_a_time(tmp_path):
    path = tmp_path / "c"
    entered = threading.Event()

    def second():
        with S.creation_lock(path):
            entered.set()

    with S.creation_lock(path):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3)  # blocked while the first holds it
    t.join(5)
    assert entered.is_set()


def test_write_manifest_replaces_it_whole(tmp_path):
    path = tmp_path / "manifest.json"
    S.write_manifest(path, {"a": 1})
    S.write_manifest(path, {"a": 2, "b": [1]})
    assert S.read_manifest(path) == {"a": 2, "b": [1]} and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert S.read_manifest(tmp_path / "missing.json") == {}


def test_digests_and_default_dir(tmp_path, monkeypatch):
    d = tmp_path / "teachers"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "w.bin").write_bytes(b"12")
    before = S.dir_digest(d)
    assert S.dir_digest(d) == before
    (d / "sub" / "w.bin").write_bytes(b"123")
    assert S.dir_digest(d) != before
    (tmp_path / "f").write_bytes(b"abc")
    assert S.file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert S.file_size(tmp_path / "f") == 3 and S.file_size(tmp_path / "none") is None
    monkeypatch.setenv("FASTMT_CACHE", str(tmp_path / "home"))
    a, b = S.default_dir({"k": 1}), S.default_dir({"k": 2})
    assert a.parent == b.parent == tmp_path / "home" / "teachers" and a != b and a == S.default_dir({"k": 1})
