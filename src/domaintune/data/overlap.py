"""Prompt overlap between two sets of rows: the question a model is tested on, seen in its training data.

Three kinds, strongest first:

* `exact`: the same prompt after normalisation (`text.prompt_key`: case, width, punctuation and whitespace
  folded), at any length: "What is (are) Acromegaly ?" repeats "what is are acromegaly";
* `near`: a near-duplicate prompt: the Jaccard similarity of the prompts' character n-grams and of their word
  2-grams (CJK: characters only) both reach the threshold; candidates from MinHash-LSH, decided on the shingle
  sets themselves (`PromptHasher`);
* `ngram`: a shared long n-gram (`ngram` words, characters for CJK), for long texts that share a passage.

`PromptIndex` holds one side (val/test prompts); `find_overlaps` and `leakage_table` compare whole sets. The
data stage's decontamination, its report's leakage table and evaluation all use these, so "0 overlaps" means
the same thing everywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, pairwise, repeat
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from domaintune.data.minhash import LSHIndex, MinHasher
from domaintune.data.text import is_cjk, loose_text, prompt_key, words

PROMPT_WORD_NGRAM = 2  # shingle size in words of the near-duplicate prompt check
PROMPT_NUM_PERM = 128  # MinHash permutations of a prompt: they only find candidates, the shingle sets decide
LSH_BANDS, LSH_ROWS = 16, 8  # of the 128 values: a pair at 0.85 shares a band with probability 0.99
MAX_BUCKET = 64  # prompts kept per band key: a question template's common band stops growing there
MAX_VERIFIED = 4  # candidates verified per prompt, the best estimates first
ESTIMATE_MARGIN = 0.1  # a candidate's estimate may be this far below the threshold (3 standard deviations)
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Match:
    """The held row a prompt matched: its id, how (exact | near | ngram) and the similarity (1.0 for exact)."""

    matched_id: str
    kind: str
    similarity: float


@dataclass(frozen=True)
class Overlap:
    """A row of the first set (`row_id`, e.g. train) whose prompt matches a row of the second (`matched_id`, e.g.
    test)."""

    row_id: str
    matched_id: str
    kind: str
    similarity: float


def row_prompt(row: Mapping[str, Any]) -> str:
    """The user side of a row in any format the data stage reads or writes: messages (user turns), ShareGPT
    (human turns), Alpaca (instruction and input), a preference / unpaired / prompt row (its prompt's user turns)
    or a raw text row (the text)."""
    if isinstance(row.get("messages"), list):
        return "\n".join(str(m.get("content") or "") for m in row["messages"] if m.get("role") == "user")
    if isinstance(row.get("conversations"), list):
        turns = row["conversations"]
        return "\n".join(str(t.get("value") or "") for t in turns if t.get("from") in ("human", "user"))
    if "instruction" in row or "input" in row:
        return "\n".join(str(row.get(k) or "") for k in ("instruction", "input"))
    if isinstance(row.get("prompt"), list):  # preference / unpaired / prompt rows (data.kind)
        return "\n".join(str(m.get("content") or "") for m in row["prompt"] if m.get("role") == "user")
    return str(row.get("text") or "")


def ngram_hashes(text: str, n: int) -> list[int]:
    """Hashes of the text's character n-grams (CJK, whitespace removed) or word n-grams."""
    if is_cjk(text):
        compact = _WS.sub("", text)
        grams = [compact[i : i + n] for i in range(len(compact) - n + 1)]
    else:
        toks = words(text)
        grams = [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return [xxhash.xxh64_intdigest(g.encode()) for g in grams]


Shingles = tuple[frozenset[str], frozenset[Any] | None]  # character n-grams, word 2-grams (None for CJK)


class PromptHasher:
    """Exact keys, MinHash signatures and shingle sets of prompts, as the overlap checks and the split's groups
    compare them.

    Two prompts are near duplicates when the Jaccard similarity of their character n-grams (of the key) and
    that of their word 2-grams both reach the threshold (CJK: the character n-grams alone): characters alone
    call "... paraplegia type 7 ?" a copy of "... type 8 ?", words alone call "... for Dyslexia ?" a copy of
    "... for Hydromyelia ?" in a long question template. MinHash signatures of the character n-grams only find
    candidates: LSH bands (16 x 8 rows: 99% of pairs at 0.85 share a band), then at most `MAX_VERIFIED` per
    prompt, the best estimates at most `ESTIMATE_MARGIN` below the threshold; the decision is taken on the
    shingle sets themselves."""

    def __init__(self, near_threshold: float | None = 0.85, char_ngram: int = 5):
        self.near_threshold = near_threshold
        self.char_ngram = char_ngram
        self.minhash: MinHasher | None = None
        self.lsh: LSHIndex | None = None
        if near_threshold is not None:
            self.minhash = MinHasher(PROMPT_NUM_PERM, char_ngram, PROMPT_WORD_NGRAM, chars_only=True)
            self.lsh = LSHIndex(near_threshold, PROMPT_NUM_PERM, bands=LSH_BANDS, rows=LSH_ROWS)

    @property
    def candidate_threshold(self) -> float:
        """The signature estimate a pair needs to be verified."""
        return max(0.05, (self.near_threshold or 0.0) - ESTIMATE_MARGIN)

    def keys(self, prompts: Sequence[str]) -> list[str]:
        return [prompt_key(p) for p in prompts]

    def shingles(self, prompt: str, key: str) -> Shingles:
        n = self.char_ngram
        chars = frozenset([key[i : i + n] for i in range(max(1, len(key) - n + 1))])
        if not key.isascii() and is_cjk(key):
            return chars, None
        toks = loose_text(prompt).split()
        pairs = frozenset(pairwise(toks)) if len(toks) > 1 else frozenset([(toks[0], "")] if toks else [])
        return chars, pairs

    def similar(self, a: Shingles, b: Shingles) -> float | None:
        """The similarity of two prompts (the lower of the character and word Jaccard) when it reaches the
        threshold, else None."""
        if self.near_threshold is None:
            return None
        sim = _jaccard(a[0], b[0])
        if sim >= self.near_threshold and a[1] is not None and b[1] is not None:
            sim = min(sim, _jaccard(a[1], b[1]))
        return sim if sim >= self.near_threshold else None


def _jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class PromptBatch:
    """Prompts hashed together: keys, signatures and band keys (of the prompts that have a key); shingle sets
    are made when a candidate needs them."""

    def __init__(self, hasher: PromptHasher, prompts: Sequence[str], keys: list[str]):
        self.hasher = hasher
        self.prompts = prompts
        self.keys = keys
        self.sigs = np.zeros((len(prompts), PROMPT_NUM_PERM), dtype=np.uint32)
        self.bands: list[list[int]] = [[] for _ in prompts]
        signed = [i for i, k in enumerate(keys) if k]
        if hasher.minhash is not None and hasher.lsh is not None and signed:
            self.sigs[signed] = hasher.minhash.signatures([keys[i] for i in signed])
            for i, row in zip(signed, hasher.lsh.band_keys(self.sigs[signed]).tolist()):
                self.bands[i] = row
        self._shingles: dict[int, Shingles] = {}

    def shingles(self, i: int) -> Shingles:
        if i not in self._shingles:
            self._shingles[i] = self.hasher.shingles(self.prompts[i], self.keys[i])
        return self._shingles[i]


class PromptIndex:
    """The prompts of held-out rows, to look other prompts up in: exact key, MinHash bands, long n-grams."""

    def __init__(
        self,
        near_threshold: float | None = 0.85,
        ngram: int | None = None,
        char_ngram: int = 5,
        hasher: PromptHasher | None = None,
    ):
        self.hasher = hasher or PromptHasher(near_threshold, char_ngram)
        self.ngram = ngram
        self.size = 0
        self._exact: dict[str, str] = {}  # prompt key -> id of the first held row with it
        self._grams: dict[int, str] = {}  # n-gram hash -> id of the first held row with it
        self._buckets: dict[int, list[int]] = {}  # band key -> held prompts (positions), at most MAX_BUCKET
        self._ids: list[str] = []  # per position: the held row's id, prompt and key
        self._prompts: list[str] = []
        self._keys: list[str] = []
        self._store = np.zeros((1024, PROMPT_NUM_PERM), dtype=np.uint32)  # signatures, by position
        self._shingles: dict[int, Shingles] = {}

    # -- adding ------------------------------------------------------------------------------------
    def add(self, ids: Sequence[str], prompts: Sequence[str], texts: Sequence[str] | None = None) -> None:
        """Held rows: their ids, prompts and (for the n-gram check) the text compared, default the prompt."""
        self.size += len(ids)
        if self.ngram is not None:
            for rid, text in zip(ids, texts if texts is not None else prompts):
                for g in ngram_hashes(text, self.ngram):
                    self._grams.setdefault(g, rid)
        keys = self.hasher.keys(prompts)
        new = []
        for i, key in enumerate(keys):
            if key and key not in self._exact:  # a repeated prompt is found by its key: no second LSH entry
                self._exact[key] = ids[i]
                new.append(i)
        if new:
            batch = PromptBatch(self.hasher, [prompts[i] for i in new], [keys[i] for i in new])
            self._insert([ids[i] for i in new], batch, list(range(len(new))))

    def _insert(self, ids: Sequence[str], batch: PromptBatch, which: list[int]) -> None:
        """Remember `which` prompts of `batch` (with their ids, in order) for the near check."""
        if self.hasher.lsh is None or not which:
            return
        base = len(self._ids)
        for pos, i in enumerate(which, start=base):
            for band in batch.bands[i]:
                bucket = self._buckets.setdefault(band, [])
                if len(bucket) < MAX_BUCKET:
                    bucket.append(pos)
            if i in batch._shingles:
                self._shingles[pos] = batch._shingles[i]
        self._ids.extend(ids)
        self._prompts.extend(batch.prompts[i] for i in which)
        self._keys.extend(batch.keys[i] for i in which)
        if len(self._ids) > len(self._store):  # grown by doubling: no copy per batch
            grown = np.zeros((max(len(self._ids), 2 * len(self._store)), PROMPT_NUM_PERM), dtype=np.uint32)
            grown[:base] = self._store[:base]
            self._store = grown
        self._store[base : len(self._ids)] = batch.sigs[which]

    def _held_shingles(self, pos: int) -> Shingles:
        if pos not in self._shingles:
            self._shingles[pos] = self.hasher.shingles(self._prompts[pos], self._keys[pos])
        return self._shingles[pos]

    # -- looking up ----------------------------------------------------------------------------------
    def match(self, prompts: Sequence[str], texts: Sequence[str] | None = None) -> list[Match | None]:
        """For each prompt, the held row it repeats (exact first, then the most similar near one, then a
        shared n-gram), or None."""
        out = self.match_batch(PromptBatch(self.hasher, prompts, self.hasher.keys(prompts)))
        if self.ngram is not None and self._grams:
            for i, m in enumerate(out):
                if m is None:
                    text = texts[i] if texts is not None else prompts[i]
                    hit = next((self._grams[g] for g in ngram_hashes(text, self.ngram) if g in self._grams), None)
                    out[i] = Match(hit, "ngram", 0.0) if hit is not None else None
        return out

    def match_batch(self, batch: PromptBatch) -> list[Match | None]:
        """`match` without the n-gram check, for prompts hashed once (`PromptBatch`) and looked up in several indexes."""
        keys = batch.keys
        out: list[Match | None] = [
            Match(self._exact[k], "exact", 1.0) if k and k in self._exact else None for k in keys
        ]
        if self._buckets:
            for i, found in self._near(batch, [i for i, m in enumerate(out) if m is None and keys[i]]).items():
                out[i] = found
        return out

    def add_new(self, ids: Sequence[str], prompts: Sequence[str]) -> list[Match | None]:
        """Keep-first, in order: each prompt is matched (exact, then near) against the prompts added before it,
        this batch's included; the ones that match nothing are added. (No n-grams.)"""
        keys = self.hasher.keys(prompts)
        batch = PromptBatch(self.hasher, prompts, keys)
        prior = self._near(batch, [i for i, k in enumerate(keys) if k and k not in self._exact])
        local: dict[int, list[int]] = {}  # band key -> prompts of this batch kept so far
        kept: list[int] = []
        out: list[Match | None] = [None] * len(prompts)
        for i, key in enumerate(keys):
            if key in self._exact:
                out[i] = Match(self._exact[key], "exact", 1.0)
                continue
            nearest = self._near_local(batch, i, local)
            earlier = prior.get(i)
            if nearest is not None and (earlier is None or nearest[0] > earlier.similarity):
                earlier = Match(ids[nearest[1]], "near", round(nearest[0], 3))
            out[i] = earlier
            if earlier is None and key:  # a new prompt: later ones are compared with it
                kept.append(i)
                self._exact[key] = ids[i]
                for band in batch.bands[i]:
                    bucket = local.setdefault(band, [])
                    if len(bucket) < MAX_BUCKET:
                        bucket.append(i)
        self.size += len(kept)
        self._insert([ids[i] for i in kept], batch, kept)
        return out

    def _near(self, batch: PromptBatch, which: Iterable[int]) -> dict[int, Match]:
        """For prompts of `batch`, the most similar held prompt at or above the threshold (earliest on ties)."""
        owners = [i for i in which for _ in batch.bands[i]]
        hits = list(map(self._buckets.get, [b for i in which for b in batch.bands[i]], repeat(None)))
        sizes = np.fromiter((len(h) if h else 0 for h in hits), dtype=np.int64, count=len(hits))
        if not sizes.sum():
            return {}
        docs = np.repeat(np.asarray(owners, dtype=np.int64), sizes)
        cands = np.fromiter(chain.from_iterable(h for h in hits if h), dtype=np.int64, count=int(sizes.sum()))
        pair = np.unique(docs << 32 | cands)
        d_arr, c_arr = pair >> 32, pair & 0xFFFFFFFF
        estimate = np.count_nonzero(self._store[c_arr] == batch.sigs[d_arr], axis=1) / PROMPT_NUM_PERM
        ok = estimate >= self.hasher.candidate_threshold
        d_arr, c_arr, estimate = d_arr[ok], c_arr[ok], estimate[ok]
        order = np.lexsort((c_arr, -estimate, d_arr))  # per prompt: best estimates first
        d_arr, c_arr = d_arr[order], c_arr[order]
        starts = np.r_[0, np.nonzero(d_arr[1:] != d_arr[:-1])[0] + 1] if len(d_arr) else np.zeros(0, np.int64)
        rank = np.arange(len(d_arr)) - np.repeat(starts, np.diff(np.r_[starts, len(d_arr)]))
        best: dict[int, tuple[float, int]] = {}
        for d, c in zip(d_arr[rank < MAX_VERIFIED].tolist(), c_arr[rank < MAX_VERIFIED].tolist()):
            sim = self.hasher.similar(batch.shingles(d), self._held_shingles(c))
            if sim is not None and (d not in best or (-sim, c) < (-best[d][0], best[d][1])):
                best[d] = (sim, c)
        return {d: Match(self._ids[c], "near", round(sim, 3)) for d, (sim, c) in best.items()}

    def _near_local(self, batch: PromptBatch, i: int, local: dict[int, list[int]]) -> tuple[float, int] | None:
        """(similarity, position) of the nearest prompt kept earlier in this batch (through the same bands)."""
        cands = sorted({j for band in batch.bands[i] for j in local.get(band, ())})
        if not cands:
            return None
        estimate = np.count_nonzero(batch.sigs[cands] == batch.sigs[i], axis=1) / PROMPT_NUM_PERM
        order = np.lexsort((np.asarray(cands), -estimate))[:MAX_VERIFIED].tolist()
        best: tuple[float, int] | None = None
        for k in order:
            if estimate[k] < self.hasher.candidate_threshold:
                break
            sim = self.hasher.similar(batch.shingles(i), batch.shingles(cands[k]))
            if sim is not None and (best is None or sim > best[0]):
                best = (sim, cands[k])
        return best


def _batches(rows: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[tuple[str, str]]]:
    """(id, prompt) of the rows in batches; a row without an id is named by its position (`#k`)."""
    batch: list[tuple[str, str]] = []
    for k, row in enumerate(rows):
        batch.append((str(row.get("id", f"#{k}")), row_prompt(row)))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def find_overlaps(
    train_rows: Iterable[Mapping[str, Any]],
    test_rows: Iterable[Mapping[str, Any]],
    *,
    near_threshold: float | None = 0.85,
    ngram: int | None = None,
    char_ngram: int = 5,
    batch_size: int = 4096,
) -> list[Overlap]:
    """Every train row whose prompt repeats a test row's prompt: exactly (after normalisation), as a near
    duplicate (`near_threshold`; None: off) or through a shared `ngram` (None: off). Rows in any supported
    format (messages, alpaca, sharegpt, text) with an `id`; train rows are streamed, test rows are indexed."""
    index = PromptIndex(near_threshold, ngram, char_ngram)
    for batch in _batches(test_rows, batch_size):
        index.add([i for i, _ in batch], [p for _, p in batch])
    found: list[Overlap] = []
    for batch in _batches(train_rows, batch_size):
        for (rid, _), m in zip(batch, index.match([p for _, p in batch])):
            if m is not None:
                found.append(Overlap(rid, m.matched_id, m.kind, m.similarity))
    return found


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def leakage_table(
    files: Mapping[str, Path], *, near_threshold: float | None = 0.85, char_ngram: int = 5
) -> list[dict[str, Any]]:
    """Exact and near prompt overlaps between every pair of split files (in the mapping's order: each split
    against every later one), with a few example pairs. Each file is read and hashed once; missing files are
    left out."""
    names = [n for n in files if files[n].is_file()]
    hasher = PromptHasher(near_threshold, char_ngram)
    indexes = {name: PromptIndex(hasher=hasher) for name in names[1:]}
    for name, index in indexes.items():
        for batch in _batches(_read_jsonl(files[name]), 4096):
            index.add([i for i, _ in batch], [p for _, p in batch])
    table: dict[tuple[str, str], dict[str, Any]] = {
        (a, b): {"split": a, "against": b, "rows": 0, "exact": 0, "near": 0, "examples": []}
        for k, a in enumerate(names)
        for b in names[k + 1 :]
    }
    for k, name in enumerate(names[:-1]):
        for batch in _batches(_read_jsonl(files[name]), 4096):
            prompts = [p for _, p in batch]
            hashed = PromptBatch(hasher, prompts, hasher.keys(prompts))
            for other in names[k + 1 :]:
                entry = table[(name, other)]
                entry["rows"] += len(batch)
                for (rid, _), m in zip(batch, indexes[other].match_batch(hashed)):
                    if m is not None:
                        entry[m.kind] += 1
                        if len(entry["examples"]) < 5:
                            entry["examples"].append([rid, m.matched_id, m.kind, m.similarity])
    return list(table.values())
