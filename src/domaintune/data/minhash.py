"""Vectorised MinHash + banded LSH for near-duplicate removal.

Shingles: character n-grams for CJK text (whitespace removed), word n-grams otherwise.
Shingles are hashed to 64 bits with a vectorised polynomial rolling hash over code points
(words are hashed with xxhash first) and a splitmix64 finaliser. Each of the `num_perm`
hash functions is h_i(x) = (a_i * x + b_i) mod 2^64 >> 32 (multiply-shift, odd a_i), applied
to a whole batch of documents at once with numpy; `np.minimum.reduceat` gives the signatures.
LSH splits a signature into `bands` bands of `rows` values; a document whose band matches a
kept document's band is a candidate and is a duplicate when the signatures' estimated
Jaccard similarity reaches the threshold (so the result does not depend on band collisions
alone). The first document of a cluster is kept.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np
import xxhash

_WORD_RE = re.compile(r"\w+", re.U)
_WS_RE = re.compile(r"\s+")
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_P = np.uint64(0x100000001B3)  # FNV prime: rolling-hash base


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _rolling(values: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of n consecutive values (uint64)."""
    count = len(values) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        h = h * _P + values[k : k + count]
    return h


@functools.lru_cache(maxsize=32)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising weighted false-positive/negative areas (datasketch's criterion)."""
    from scipy.integrate import quad

    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = quad(lambda s, r=r, b=b: 1 - (1 - s**r) ** b, 0.0, threshold)[0]
            fn = quad(lambda s, r=r, b=b: 1 - (1 - (1 - s**r) ** b), threshold, 1.0)[0]
            err = fp * fp_weight + fn * fn_weight
            if err < best_err:
                best, best_err = (b, r), err
    return best


_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x3040, 0x30FF), (0xAC00, 0xD7AF))
_SPACE_CPS = np.array([0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C, 0xA0, 0x3000], dtype=np.uint32)


class MinHasher:
    """MinHash signatures for a batch of documents.

    algorithm "oph" (default): one-permutation hashing — each shingle is hashed once, the top
    bits pick one of `num_perm` bins, the bin keeps its minimum — with *optimal densification*
    (Shrivastava, ICML 2017) filling empty bins from other bins along a fixed, document-independent
    probe sequence, so equal bins still occur with probability = Jaccard similarity.
    algorithm "kperm": the classic scheme, `num_perm` multiply-shift hash functions per shingle
    (128x more arithmetic; kept as the reference).
    """

    def __init__(
        self,
        num_perm: int = 128,
        char_ngram: int = 5,
        word_ngram: int = 3,
        seed: int = 1,
        algorithm: str = "oph",
        chars_only: bool = False,
    ):
        if algorithm not in ("oph", "kperm"):
            raise ValueError(f"unknown MinHash algorithm {algorithm!r} (oph or kperm)")
        self.chars_only = chars_only  # character n-grams for every text, not only CJK
        self.num_perm = num_perm
        self.char_ngram = char_ngram
        self.word_ngram = word_ngram
        self.algorithm = algorithm
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.seed_mix = np.uint64(int(rng.integers(0, 2**63)))
        # Densification probe sequence: for empty bin j, try bins probes[j, 0], probes[j, 1], ...
        self._probes = rng.integers(0, num_perm, size=(num_perm, 64), dtype=np.int64)

    # ---- shingling -------------------------------------------------------------------------
    def _word_shingles(self, text: str) -> np.ndarray:
        toks = _WORD_RE.findall(text.lower())
        values = np.fromiter((xxhash.xxh64_intdigest(t.encode()) for t in toks), dtype=np.uint64, count=len(toks))
        if len(values) == 0:
            return np.zeros(1, dtype=np.uint64)
        n = min(self.word_ngram, len(values))
        return _rolling(values, n) ^ np.uint64(n)

    def _char_shingles_batch(
        self, cps: np.ndarray, lengths: np.ndarray, doc: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Char n-gram hashes of many CJK texts at once (code points concatenated): (hashes, doc index)."""
        n = self.char_ngram
        n_docs = len(lengths)
        keep = (cps > 0x20) & (cps != 0xA0) & (cps != 0x3000)
        if not keep.all():
            cps, doc = cps[keep], doc[keep]
        cps = cps.astype(np.uint64)
        clen = np.bincount(doc, minlength=n_docs)
        hashes, owners = [], []
        if len(cps) >= n:
            h = _rolling(cps, n)
            valid = doc[: len(h)] == doc[n - 1 :]
            hashes.append(h[valid])
            owners.append(doc[: len(h)][valid])
        short = np.nonzero(clen < n)[0]
        if len(short):  # documents shorter than n: the whole (compacted) text is their one shingle
            offsets = np.concatenate([[0], np.cumsum(clen)])
            for i in short.tolist():
                vals = cps[offsets[i] : offsets[i + 1]]
                h = _rolling(vals, len(vals)) if len(vals) else np.zeros(1, dtype=np.uint64)
                hashes.append(h)
                owners.append(np.full(len(h), i, dtype=np.int32))
        return np.concatenate(hashes) ^ np.uint64(n), np.concatenate(owners)

    @staticmethod
    def _codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Concatenated code points, per-document lengths and the document index of each code point."""
        cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        doc = np.repeat(np.arange(len(texts), dtype=np.int32), lengths)
        return cps, lengths, doc

    @staticmethod
    def cjk_flags_from(cps: np.ndarray, lengths: np.ndarray, doc: np.ndarray) -> np.ndarray:
        """Per document: are at least 30% of its letters CJK (Han, kana, hangul)?"""
        cjk = ((cps >= 0x2E80) & (cps <= 0xD7AF)) | ((cps >= 0xF900) & (cps <= 0xFAFF))
        low = cps | np.uint32(32)
        latin = (low >= ord("a")) & (low <= ord("z"))
        c = np.bincount(doc[cjk], minlength=len(lengths))
        la = np.bincount(doc[latin], minlength=len(lengths))
        total = c + la
        return (total > 0) & (c * 10 >= 3 * total)

    def cjk_flags(self, texts: list[str]) -> np.ndarray:
        return self.cjk_flags_from(*self._codepoints(texts))

    def shingle_hashes_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All (mixed, seeded) shingle hashes of a batch and the document index of each."""
        cps, lengths, doc = self._codepoints(texts)
        flags = np.ones(len(texts), dtype=bool) if self.chars_only else self.cjk_flags_from(cps, lengths, doc)
        hashes, owners = [], []
        if flags.all():
            h, o = self._char_shingles_batch(cps, lengths, doc)
            hashes.append(h)
            owners.append(o)
        elif flags.any():
            cjk_idx = np.nonzero(flags)[0]
            h, o = self._char_shingles_batch(*self._codepoints([texts[i] for i in cjk_idx.tolist()]))
            hashes.append(h)
            owners.append(cjk_idx[o])
        for i in np.nonzero(~flags)[0].tolist():
            h = self._word_shingles(texts[i])
            hashes.append(h)
            owners.append(np.full(len(h), i, dtype=np.int64))
        return _mix64(np.concatenate(hashes) ^ self.seed_mix), np.concatenate(owners).astype(np.int64)

    def shingle_hashes(self, text: str) -> np.ndarray:
        return self.shingle_hashes_batch([text])[0]

    # ---- signatures ------------------------------------------------------------------------
    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures, computed for the whole batch at once."""
        if not texts:
            return np.zeros((0, self.num_perm), dtype=np.uint32)
        hashes, owners = self.shingle_hashes_batch(texts)
        if self.algorithm == "kperm":
            return self._kperm(hashes, owners, len(texts))
        return self._oph(hashes, owners, len(texts))

    def _kperm(self, hashes: np.ndarray, owners: np.ndarray, n_docs: int) -> np.ndarray:
        order = np.argsort(owners, kind="stable")
        hashes, owners = hashes[order], owners[order]
        starts = np.searchsorted(owners, np.arange(n_docs))
        out = np.empty((n_docs, self.num_perm), dtype=np.uint32)
        block = 32
        for j in range(0, self.num_perm, block):
            m = hashes[:, None] * self.a[None, j : j + block]
            m += self.b[None, j : j + block]
            m >>= np.uint64(32)
            out[:, j : j + block] = np.minimum.reduceat(m, starts, axis=0)
        return out

    def _oph(self, hashes: np.ndarray, owners: np.ndarray, n_docs: int) -> np.ndarray:
        k = self.num_perm
        h = hashes
        bins = (h % np.uint64(k)).astype(np.int64) if k & (k - 1) else (h & np.uint64(k - 1)).astype(np.int64)
        values = (h >> np.uint64(32)).astype(np.uint32)
        empty_value = np.uint32(0xFFFFFFFF)
        flat = np.full(n_docs * k, empty_value, dtype=np.uint32)
        np.minimum.at(flat, owners * k + bins, values)
        sig = flat.reshape(n_docs, k)
        # Optimal densification: an empty bin copies the first non-empty bin on its probe sequence.
        empty_rows, empty_cols = np.nonzero(sig == empty_value)
        if len(empty_rows):
            fill = np.full(len(empty_rows), empty_value, dtype=np.uint32)
            todo = np.arange(len(empty_rows))
            for t in range(self._probes.shape[1]):
                src = sig[empty_rows[todo], self._probes[empty_cols[todo], t]]
                ok = src != empty_value
                fill[todo[ok]] = src[ok]
                todo = todo[~ok]
                if not len(todo):
                    break
            for idx in todo.tolist():  # extremely rare: next non-empty bin cyclically
                row = sig[empty_rows[idx]]
                nonempty = np.nonzero(row != empty_value)[0]
                fill[idx] = row[nonempty[0]] if len(nonempty) else 0
            sig = sig.copy()
            sig[empty_rows, empty_cols] = fill
        return sig


@dataclass
class DedupResult:
    duplicate_of: Any  # the id (as given to `add_batch`) of the kept document this one duplicates; None: kept
    similarity: float


@dataclass
class LSHIndex:
    """Keep-first near-duplicate index over MinHash signatures.

    Each band key maps to the slot of the first kept document with that band (`_main`); later
    kept documents with the same band key go to `_overflow`. Lookups for a whole batch run as
    one C-level `map` over the band keys, and candidate pairs are verified with one vectorised
    signature comparison.
    """

    threshold: float
    num_perm: int
    bands: int = 0  # 0 (with rows 0): chosen from the threshold
    rows: int = 0
    _main: dict = field(default_factory=dict)
    _overflow: dict = field(default_factory=dict)
    _sigs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.uint32))
    _ids: list = field(default_factory=list)
    _count: int = 0

    def __post_init__(self):
        if not self.bands or not self.rows:
            # Weighted towards recall: candidates are verified on the signatures afterwards.
            self.bands, self.rows = optimal_bands(self.threshold, self.num_perm, fp_weight=0.3, fn_weight=0.7)
        self._sigs = np.zeros((1024, self.num_perm), dtype=np.uint32)
        rng = np.random.default_rng(12345)
        self._band_salt = rng.integers(0, 2**63, size=self.bands, dtype=np.uint64)

    def __len__(self) -> int:
        return self._count

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        n = sigs.shape[0]
        used = sigs[:, : self.bands * self.rows].reshape(n, self.bands, self.rows).astype(np.uint64)
        h = np.broadcast_to(self._band_salt, (n, self.bands)).copy()
        for k in range(self.rows):
            h = _mix64(h * _P + used[:, :, k])
        return h

    def _store_many(self, sigs: np.ndarray) -> np.ndarray:
        need = self._count + len(sigs)
        if need > len(self._sigs):
            grown = np.zeros((max(need, 2 * len(self._sigs)), self.num_perm), dtype=np.uint32)
            grown[: self._count] = self._sigs[: self._count]
            self._sigs = grown
        self._sigs[self._count : need] = sigs
        slots = np.arange(self._count, need)
        self._count = need
        return slots

    def _best(self, docs: np.ndarray, slots: np.ndarray, sigs: np.ndarray, ref) -> dict[int, tuple[int, float]]:
        """Per doc, the most similar candidate (earliest on ties) whose estimate reaches the threshold."""
        if len(docs) == 0:
            return {}
        pair = np.unique(docs.astype(np.int64) << 32 | slots.astype(np.int64))
        docs, slots = pair >> 32, pair & 0xFFFFFFFF
        sims = np.count_nonzero(ref[slots] == sigs[docs], axis=1) / self.num_perm
        ok = sims >= self.threshold
        if not ok.any():
            return {}
        docs, slots, sims = docs[ok], slots[ok], sims[ok]
        order = np.lexsort((slots, -sims, docs))
        docs, slots, sims = docs[order], slots[order], sims[order]
        first = np.ones(len(docs), dtype=bool)
        first[1:] = docs[1:] != docs[:-1]
        return {int(d): (int(s), float(v)) for d, s, v in zip(docs[first], slots[first], sims[first])}

    def add_batch(self, sigs: np.ndarray, ids: list) -> list[DedupResult]:
        """Query each signature against kept documents (in order); insert it when it is new.

        1. the whole batch against documents kept in earlier batches (vectorised);
        2. the remaining documents against each other, resolved in order (keep-first);
        3. the documents kept from this batch are inserted.
        """
        n, b = sigs.shape[0], self.bands
        if n == 0:
            return []
        keys = self.band_keys(sigs)
        flat = keys.ravel().tolist()
        hit = np.fromiter(map(self._main.get, flat, repeat(-1, len(flat))), dtype=np.int64, count=len(flat))
        pos = np.nonzero(hit >= 0)[0]
        docs, slots = pos // b, hit[pos]
        if self._overflow and len(pos):
            extra_d, extra_s = [], []
            for p in pos.tolist():
                more = self._overflow.get(flat[p])
                if more:
                    extra_d.extend([p // b] * len(more))
                    extra_s.extend(more)
            if extra_d:
                docs = np.concatenate([docs, np.asarray(extra_d, dtype=np.int64)])
                slots = np.concatenate([slots, np.asarray(extra_s, dtype=np.int64)])
        prior = self._best(docs, slots, sigs, self._sigs)
        results: list[DedupResult | None] = [None] * n
        for d, (slot, sim) in prior.items():
            results[d] = DedupResult(self._ids[slot], sim)

        # within the batch: pairs of remaining documents sharing a band
        rest = np.asarray([i for i in range(n) if results[i] is None], dtype=np.int64)
        later: dict[int, list[tuple[int, float]]] = {}
        if len(rest) > 1:
            sub = keys[rest].ravel()
            owner = np.repeat(rest, b)
            order = np.argsort(sub, kind="stable")
            sub, owner = sub[order], owner[order]
            same = np.nonzero(sub[1:] == sub[:-1])[0]
            if len(same):
                pa, pb = [], []
                starts = same[np.r_[True, same[1:] != same[:-1] + 1]]
                for st in starts.tolist():
                    en = st + 1
                    while en < len(sub) and sub[en] == sub[st]:
                        en += 1
                    members = sorted(set(owner[st:en].tolist()))
                    for x, i in enumerate(members):
                        for j in members[x + 1 :]:
                            pa.append(i)
                            pb.append(j)
                if pa:
                    pair = np.unique(np.asarray(pa, dtype=np.int64) << 32 | np.asarray(pb, dtype=np.int64))
                    pa_, pb_ = pair >> 32, pair & 0xFFFFFFFF
                    sims = np.count_nonzero(sigs[pa_] == sigs[pb_], axis=1) / self.num_perm
                    for i, j, v in zip(pa_.tolist(), pb_.tolist(), sims.tolist()):
                        if v >= self.threshold:
                            later.setdefault(j, []).append((i, v))
        kept_local: list[int] = []
        kept_set: set[int] = set()
        for i in rest.tolist():
            cands = [(v, -k, k) for k, v in later.get(i, ()) if k in kept_set]
            if cands:
                v, _, k = max(cands)
                results[i] = DedupResult(ids[k], v)
                continue
            kept_local.append(i)
            kept_set.add(i)
            results[i] = DedupResult(None, 0.0)
        if kept_local:
            slots_new = self._store_many(sigs[kept_local]).tolist()
            main, overflow = self._main, self._overflow
            for i, slot in zip(kept_local, slots_new):
                self._ids.append(ids[i])
                for key in flat[i * b : (i + 1) * b]:
                    prev = main.setdefault(key, slot)
                    if prev != slot:
                        overflow.setdefault(key, []).append(slot)
        return results  # type: ignore[return-value]

    def all_pairs(self, sigs: np.ndarray) -> list[tuple[int, int, float]]:
        """Every pair (i < j) of the given signatures that shares a band and whose estimated
        Jaccard reaches the threshold (batch mode, no keep-first; used to evaluate the index)."""
        keys = self.band_keys(sigs)
        buckets: dict[int, list[int]] = {}
        for i, row in enumerate(keys.tolist()):
            for key in row:
                buckets.setdefault(key, []).append(i)
        cand = {
            (a, b)
            for members in buckets.values()
            if len(members) > 1
            for x, a in enumerate(members)
            for b in members[x + 1 :]
        }
        out = []
        for a, b in sorted(cand):
            sim = float(np.count_nonzero(sigs[a] == sigs[b])) / self.num_perm
            if sim >= self.threshold:
                out.append((a, b, sim))
        return out
