"""`domaintune feedback export`: turn logged requests + feedback into the next round's datasets.

- SFT rows (the data stage's messages form): the logged prompt with the user's correction as the answer.
- Preference rows for DPO (TRL's conversational form): prompt messages, chosen = correction,
  rejected = the model's original answer.
- Unpaired rows for KTO: prompt messages, completion = the served answer, label = its latest thumbs
  (up: true, down: false); a correction is also a desirable completion.

Everything in the store is already PII-redacted. Rows are deduplicated against each other and
against `<output_dir>/data/train.jsonl` (exact, on normalised text; and near-duplicates with the
data stage's MinHash-LSH at `data.dedup.threshold`). For a request with several feedback rows,
the latest correction wins.

Tool calls (docs/tool-calls.md): a logged chat that rendered `tools` gives rows with that `tools` list, its
conversation keeps assistant `tool_calls` and `tool` messages, and a served answer that was read back as calls is
an assistant message with those `tool_calls` (OpenAI's shape, the data stage's). A correction to such a request
that is written as calls (`<tool_call>{"name", "arguments"}</tool_call>`, as the model writes them) becomes
`tool_calls` too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.serve.store import Store, default_store_url
from domaintune.utils.io import read_jsonl, write_json, write_jsonl

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.data.config import DedupConfig


def _row_text(messages: list[dict[str, Any]]) -> str:
    """Dedup text: each non-system message's content and its calls (the data stage's `message_text`)."""
    from domaintune.data.formats import message_text

    return "\n".join(
        message_text({**m, "content": str(m.get("content") or "")}) for m in messages if m.get("role") != "system"
    )


def _norm(text: str) -> str:
    from domaintune.data.text import normalise_text

    return normalise_text(text).lower()


def _prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    """The logged prompt as messages: role and content, and an assistant's `tool_calls` / a tool result's
    `tool_call_id` where the conversation has them."""
    if isinstance(prompt, str):  # /v1/completions: the raw prompt becomes one user turn
        return [{"role": "user", "content": prompt}]
    out = []
    for m in prompt:
        message = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            message["tool_calls"] = m["tool_calls"]
        if m.get("tool_call_id") is not None:
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _tools(req: Any) -> dict[str, Any]:
    """The row's `tools` field: the definitions the logged prompt rendered (nothing without them)."""
    return {"tools": req.tools} if req.tools else {}


def _served_answer(req: Any) -> dict[str, Any]:
    """The served answer as an assistant message: with the `tool_calls` it was read back as, if any (the logged
    text around them is its content)."""
    text = (req.response or "").strip()
    if not req.tool_calls:
        return {"role": "assistant", "content": text}
    from domaintune.model.tools import parse_tool_calls

    content, parsed = parse_tool_calls(text, {t["function"]["name"] for t in req.tools or []})
    # the calls are the logged ones (what the client got); the text around them is read from the logged answer
    return {"role": "assistant", "content": (content or "") if parsed else "", "tool_calls": req.tool_calls}


def _correction_answer(correction: str, req: Any) -> dict[str, Any]:
    """A correction as an assistant message: calls to the request's tools written as the model writes them
    become `tool_calls`."""
    if req.tools:
        from domaintune.model.tools import parse_tool_calls

        content, calls = parse_tool_calls(correction, {t["function"]["name"] for t in req.tools})
        if calls:
            return {"role": "assistant", "content": content or "", "tool_calls": calls}
    return {"role": "assistant", "content": correction}


def _train_messages(row: dict[str, Any], path: Path, line: int) -> list[dict[str, Any]]:
    if isinstance(row.get("messages"), list):
        return row["messages"]
    if "instruction" in row or "output" in row:  # alpaca-form training sets
        user = "\n\n".join(x for x in (row.get("instruction", ""), row.get("input", "")) if x)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row.get("output", "")}]
    raise UserError(f"{path}:{line}: row has neither `messages` nor alpaca fields; cannot deduplicate against it")


class _Deduper:
    def __init__(self, dedup_cfg: DedupConfig) -> None:
        self.seen: set[str] = set()
        self.near = bool(dedup_cfg.near)
        self.index = None
        if self.near:
            from domaintune.data.minhash import LSHIndex, MinHasher

            self.hasher = MinHasher(num_perm=dedup_cfg.num_perm)
            self.index = LSHIndex(threshold=dedup_cfg.threshold, num_perm=dedup_cfg.num_perm)
        self._next_id = 0

    def add_reference(self, texts: list[str]) -> None:
        for t in texts:
            self.seen.add(hashlib.sha256(_norm(t).encode()).hexdigest())
        if self.index is not None and texts:
            self.index.add_batch(self.hasher.signatures(texts), list(range(self._next_id, self._next_id + len(texts))))
            self._next_id += len(texts)

    def duplicate_kind(self, text: str) -> str | None:
        """ "exact" or "near" when `text` repeats one seen before; None when it is new (it is seen now)."""
        digest = hashlib.sha256(_norm(text).encode()).hexdigest()
        if digest in self.seen:
            return "exact"
        self.seen.add(digest)
        if self.index is not None:
            result = self.index.add_batch(self.hasher.signatures([text]), [self._next_id])[0]
            self._next_id += 1
            if result.duplicate_of is not None:
                return "near"
        return None


# The files `feedback export` writes; the train stage reads its defaults through these same names
# (train.dpo.path, train.orpo/simpo/reward.path: PREFERENCE_FILE; train.kto.path: UNPAIRED_FILE).
SFT_FILE = "sft.jsonl"
PREFERENCE_FILE = "preference.jsonl"
UNPAIRED_FILE = "unpaired.jsonl"


def feedback_export_dir(cfg: ProjectConfig, output_dir: Path) -> Path:
    """Where `domaintune feedback export` writes: serve.feedback_dir, else <output_dir>/feedback."""
    return Path(cfg.serve.feedback_dir or RunLayout.of(output_dir).feedback_dir)


def export_feedback(cfg: ProjectConfig, output_dir: Path | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """Write sft.jsonl, preference.jsonl, unpaired.jsonl and report.json; returns the report."""
    layout = RunLayout(Path(output_dir)) if output_dir else cfg.layout
    out_dir = Path(out_dir or feedback_export_dir(cfg, layout.root))
    url = cfg.serve.store_url or default_store_url(layout.root)
    store = Store(url, key_hash_iterations=cfg.serve.key_hash_iterations)
    pairs = store.feedback_with_requests()
    store.engine.dispose()

    latest: dict[str, tuple[Any, Any]] = {}
    ratings = {"positive": 0, "negative": 0}
    for fb, req in pairs:
        ratings["positive" if fb.rating > 0 else "negative"] += 1
        if fb.correction and fb.correction.strip():
            latest[req.id] = (fb, req)  # ordered oldest first: the last one wins

    train_path = layout.train_file
    dedup = _Deduper(cfg.data.dedup)
    train_rows = _add_training_rows(dedup, train_path)
    sft, pref, dropped = _feedback_rows(latest, dedup)
    unpaired, unpaired_dropped = _unpaired_rows(pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / SFT_FILE, sft)
    write_jsonl(out_dir / PREFERENCE_FILE, pref)
    write_jsonl(out_dir / UNPAIRED_FILE, unpaired)
    report = {
        "store": url,
        "feedback_rows": len(pairs),
        "ratings": ratings,
        "requests_with_corrections": len(latest),
        "sft_rows": len(sft),
        "preference_rows": len(pref),
        "unpaired_rows": len(unpaired),
        "unpaired_desirable": sum(r["label"] for r in unpaired),
        "dropped": dropped,
        "unpaired_dropped": unpaired_dropped,
        "deduplicated_against": str(train_path) if train_path.is_file() else None,
        "train_rows_compared": train_rows,
        "files": {
            "sft": str(out_dir / SFT_FILE),
            "preference": str(out_dir / PREFERENCE_FILE),
            "unpaired": str(out_dir / UNPAIRED_FILE),
        },
    }
    write_json(out_dir / "report.json", report)
    return report


def _add_training_rows(dedup: _Deduper, train_path: Path) -> int:
    """Make the training set's rows known to the deduper; returns how many there were (0 without one)."""
    if not train_path.is_file():
        return 0
    rows = enumerate(read_jsonl(train_path), start=1)
    texts = [_row_text(_train_messages(row, train_path, line)) for line, row in rows]
    dedup.add_reference(texts)
    return len(texts)


def _feedback_rows(
    latest: dict[str, tuple[Any, Any]], dedup: _Deduper
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(SFT rows, preference rows, dropped counts) from each request's latest correction."""
    sft, pref, dropped = [], [], {"exact": 0, "near": 0, "same_as_original": 0}
    for request_id, (fb, req) in latest.items():
        prompt = _prompt_messages(req.prompt)
        correction = fb.correction.strip()
        original = (req.response or "").strip()
        if _norm(correction) == _norm(original):
            dropped["same_as_original"] += 1
            continue
        chosen = _correction_answer(correction, req)
        messages = prompt + [chosen]
        duplicate = dedup.duplicate_kind(_row_text(messages))
        if duplicate is not None:
            dropped[duplicate] += 1
            continue
        meta = {
            "request_id": request_id,
            "model": req.model,
            "served": req.served,
            "version": req.version,
            "rating": fb.rating,
        }
        sft.append({"id": f"fb-{request_id}", "messages": messages, **_tools(req), "source": "feedback", **meta})
        if original:
            pref.append(
                {
                    "id": f"fbpref-{request_id}",
                    "prompt": prompt,
                    "chosen": [chosen],
                    "rejected": [_served_answer(req)],
                    **_tools(req),
                    "source": "feedback",
                    **meta,
                }
            )
    return sft, pref, dropped


def _unpaired_rows(pairs: list[tuple[Any, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """KTO rows: each request's served answer labelled by its latest thumbs, and each latest correction as
    desirable; exact repeats (same prompt and completion) and rating-0 rows are dropped and counted."""
    latest: dict[str, tuple[Any, Any]] = {}
    for fb, req in pairs:  # oldest first: the last rating wins
        latest[req.id] = (fb, req)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    dropped = {"no_rating": 0, "no_answer": 0, "exact": 0}
    for request_id, (fb, req) in latest.items():
        prompt = _prompt_messages(req.prompt)
        candidates = []
        if fb.rating == 0:
            dropped["no_rating"] += 1
        elif (req.response or "").strip():
            candidates.append(("served", _served_answer(req), fb.rating > 0))
        else:
            dropped["no_answer"] += 1
        if fb.correction and fb.correction.strip():
            candidates.append(("correction", _correction_answer(fb.correction.strip(), req), True))
        for origin, answer, label in candidates:
            key = hashlib.sha256(_norm(_row_text([*prompt, answer])).encode()).hexdigest()
            if key in seen:
                dropped["exact"] += 1
                continue
            seen.add(key)
            rows.append(
                {
                    "id": f"fbkto-{origin}-{request_id}",
                    "prompt": prompt,
                    "completion": [answer],
                    **_tools(req),
                    "label": label,
                    "origin": origin,
                    "source": "feedback",
                    "request_id": request_id,
                    "model": req.model,
                    "version": req.version,
                    "rating": fb.rating,
                }
            )
    return rows, dropped
