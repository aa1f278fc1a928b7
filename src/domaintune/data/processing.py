"""Per-row work done in worker processes: field mapping, normalisation, PII, filters, signatures.

Decisions that need the whole corpus (dedup, outliers, split, decontamination) are taken by
the main process (`clean.py`, `split.py`, `decontaminate.py`); this module only sees one batch at a time.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

import xxhash

from domaintune.data.config import DataConfig, NormaliseConfig
from domaintune.data.formats import message_text, qa_to_messages, row_tools, sharegpt_to_messages, validate_messages
from domaintune.data.minhash import MinHasher
from domaintune.data.pii import redact_pii
from domaintune.data.preference_rows import RowError, answers_text, canonical, map_texts, problem, prompt_user_text
from domaintune.data.readers import Record, source_name
from domaintune.data.source_config import SourceConfig
from domaintune.data.text import detect_language, normalise_text, repetition_ratio

QA_FIELDS = ("instruction", "input", "output", "system")
_WS = re.compile(r"\s+")


class Drop(Exception):  # noqa: N818 - a row's verdict carried up from the check that made it, not an error
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.info: dict[str, Any] | None = None  # what normalisation/PII changed before a filter dropped it
        self.row: dict[str, Any] | None = None  # the row as redacted, for the quarantine


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def _lookup(data: dict[str, Any], ref: str | list[str] | None) -> tuple[str | None, bool]:
    """Value of one column or several joined by a newline; (None, missing) when no column exists."""
    if ref is None:
        return None, False
    refs = [ref] if isinstance(ref, str) else ref
    present = [data[r] for r in refs if r in data]
    if not present:
        return None, True
    parts = [_as_text(v).strip() for v in present]
    return "\n".join(p for p in parts if p), False


def map_canonical(rec: Record, src: SourceConfig, row_id: str, kind: str) -> dict[str, Any]:
    """Raw record → internal row {id, kind, pref, extra, missing} of a preference / unpaired / prompt data stage
    (`preference_rows.canonical`); raises Drop naming the field at fault."""
    data = rec.data or {}
    row: dict[str, Any] = {"id": row_id, "kind": kind, "pref": None, "extra": {}, "missing": []}
    if src.fields.id and src.fields.id in data and _as_text(data[src.fields.id]).strip():
        row["id"] = _as_text(data[src.fields.id]).strip()
    try:
        row["pref"] = canonical(data, kind)
    except (RowError, ValueError, TypeError) as exc:
        raise Drop("map", f"not a {kind} row: {exc}") from None
    for name, ref in src.keep_map().items():
        if ref in data:
            row["extra"][name] = _json_safe(data[ref])
    return row


def map_record(rec: Record, src: SourceConfig, row_id: str, kind: str = "sft") -> dict[str, Any]:
    """Raw record → internal row {id, kind, fields|messages, extra, missing}; raises Drop."""
    if kind != "sft":
        return map_canonical(rec, src, row_id, kind)
    data = rec.data or {}
    f = src.fields
    mapped_any = any(v is not None for v in f.model_dump().values())
    row: dict[str, Any] = {"id": row_id, "kind": "qa", "fields": {}, "messages": None, "extra": {}, "missing": []}
    if f.id and f.id in data and _as_text(data[f.id]).strip():
        row["id"] = _as_text(data[f.id]).strip()
    kind = rec.kind
    if not mapped_any and kind == "table":
        # guess from the keys: messages / conversations / alpaca / text
        if "messages" in data:
            kind = "messages"
        elif "conversations" in data:
            kind = "sharegpt"
        elif "instruction" in data and "output" in data:
            kind = "alpaca"
        elif "text" in data:
            kind = "text"
        else:
            raise Drop(
                "map",
                "no mapped fields: record has no messages/conversations/instruction+output/text "
                "(set fields: on this source)",
            )
    try:
        if f.messages or (kind in ("messages", "canonical") and not mapped_any):
            value = data.get(f.messages or "messages")
            if value is None:
                raise Drop("filter", f"missing:{f.messages or 'messages'}")
            if isinstance(value, str):
                import json

                value = json.loads(value)
            row["kind"] = "messages"
            row["tools"] = row_tools(data)
            row["messages"] = validate_messages(value, row["tools"])
        elif kind == "sharegpt" and not mapped_any:
            row["kind"] = "messages"
            row["tools"] = row_tools(data)
            row["messages"] = sharegpt_to_messages(
                data.get("conversations"), system=data.get("system") or None, tools=row["tools"]
            )
        elif f.text or (kind == "text" and not mapped_any):
            value, missing = _lookup(data, f.text or "text")
            row["kind"] = "text"
            row["fields"] = {"text": value or ""}
            if missing:
                row["missing"].append("text")
        else:
            refs = {k: getattr(f, k) for k in QA_FIELDS}
            if not mapped_any:  # alpaca keys
                refs = {k: k for k in QA_FIELDS}
            for key, ref in refs.items():
                value, missing = _lookup(data, ref)
                if ref is not None:
                    row["fields"][key] = value or ""
                    if missing and key in ("instruction", "output"):
                        row["missing"].append(key)
            history = data.get("history") if not mapped_any else None
            if history:
                fl = row["fields"]
                row["kind"] = "messages"
                row["messages"] = qa_to_messages(
                    fl.get("instruction", ""),
                    fl.get("input", ""),
                    fl.get("output", ""),
                    fl.get("system") or None,
                    history,
                )
                row["fields"] = {}
    except (ValueError, TypeError) as exc:
        raise Drop("map", f"invalid conversation: {exc}") from None
    for name, ref in src.keep_map().items():
        if ref in data:
            row["extra"][name] = _json_safe(data[ref])
    return row


def normalise(text: str, n: NormaliseConfig) -> str:
    """`text` normalised as data.normalise says (rows, and the system prompt by the same rule)."""
    if not n.enabled:
        return text
    return normalise_text(
        text, nfkc=n.nfkc, width=n.width, html_clean=n.html, control_chars=n.control_chars, whitespace=n.whitespace
    )


def text_fields(row: dict[str, Any]) -> list[str]:
    if "pref" in row:  # each answer on its own: a pair's two answers often share most words (not repetition)
        answers = [answers_text({k: v}) for k, v in row["pref"].items() if k != "prompt"]
        return [t for t in (prompt_user_text(row["pref"]), *answers) if t]
    if row["kind"] == "messages":
        return [message_text(m) for m in row["messages"] if m["role"] != "system"]
    return [v for k, v in row["fields"].items() if k != "system"]


def field_text(row: dict[str, Any], name: str) -> str:
    if name == "all":
        return "\n".join(text_fields(row))
    if "pref" in row:
        if name == "output":
            return answers_text(row["pref"])
        return prompt_user_text(row["pref"]) if name in ("instruction", "input", "prompt") else ""
    if row["kind"] == "messages":
        if name in ("output",):
            return "\n".join(message_text(m) for m in row["messages"] if m["role"] == "assistant")
        if name in ("instruction", "input"):
            return "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
        return ""
    return row["fields"].get(name, "")


def prompt_text(row: dict[str, Any]) -> str:
    if "pref" in row:
        return prompt_user_text(row["pref"])
    if row["kind"] == "messages":
        return "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
    if row["kind"] == "text":
        return row["fields"]["text"]
    return "\n".join(row["fields"].get(k, "") for k in ("instruction", "input"))


def answer_text(row: dict[str, Any]) -> str:
    if "pref" in row:
        pref = row["pref"]  # the answer that is trained towards: chosen, the completion, the reference
        return answers_text({k: pref[k] for k in ("chosen", "completion", "reference") if k in pref})
    if row["kind"] == "messages":
        return "\n".join(message_text(m) for m in row["messages"] if m["role"] == "assistant")
    if row["kind"] == "text":
        return row["fields"]["text"]
    return row["fields"].get("output", "")


def _apply(row: dict[str, Any], fn) -> bool:
    """Apply fn to every string of a row; True when anything changed."""
    changed = False
    if "pref" in row:
        return map_texts(row["pref"], fn)
    if row["kind"] == "messages":
        for m in row["messages"]:
            new = fn(m["content"])
            if new != m["content"]:
                m["content"] = new
                changed = True
            changed = _apply_arguments(m, fn) or changed
    else:
        for k, v in row["fields"].items():
            new = fn(v)
            if new != v:
                row["fields"][k] = new
                changed = True
    return changed


def _apply_arguments(message: dict[str, Any], fn) -> bool:
    """fn on every string value of a message's tool-call arguments (PII in an order note); JSON stays valid."""
    changed = False
    for call in message.get("tool_calls") or []:
        args = json.loads(call["function"]["arguments"])
        new_args = _map_strings(args, fn)
        if new_args != args:
            call["function"]["arguments"] = json.dumps(new_args, ensure_ascii=False)
            changed = True
    return changed


def _map_strings(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


def public_row(row: dict[str, Any], source: str) -> dict[str, Any]:
    """The row as written (before formatting): messages, alpaca-like fields or text, plus extras."""
    out: dict[str, Any] = {"id": row["id"]}
    if "pref" in row:
        out.update(row["pref"])
    elif row["kind"] == "messages":
        out["messages"] = row["messages"]
        if row.get("tools"):
            out["tools"] = row["tools"]
    elif row["kind"] == "text":
        out["text"] = row["fields"]["text"]
    else:
        for k in ("instruction", "input", "output", "system"):
            if k in row["fields"] and (k != "system" or row["fields"][k]):
                out[k] = row["fields"][k]
        out.setdefault("instruction", "")
        out.setdefault("output", "")
    out["source"] = source
    out.update(row["extra"])
    return out


class RowProcessor:
    """Everything that can be decided for one row alone. Picklable; one per worker process."""

    def __init__(self, cfg: DataConfig, model_cfg: Any = None):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self._tokenizer = None
        d = cfg.dedup
        self.hasher = MinHasher(d.num_perm, d.char_ngram, d.word_ngram) if d.near else None
        self.pii_types = tuple(cfg.pii.types) if cfg.pii.types else None
        self.sources = {source_name(s, i): s for i, s in enumerate(cfg.sources)}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from domaintune.model.loader import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_cfg)
        return self._tokenizer

    def _required(self, row: dict[str, Any]) -> list[str]:
        if self.cfg.filters.required is not None:
            return list(self.cfg.filters.required)
        if row["kind"] == "messages":
            return ["messages"]
        if row["kind"] == "text":
            return ["text"]
        return [k for k in ("instruction", "output") if k in row["fields"] or k in row["missing"]]

    def _filter(self, row: dict[str, Any]) -> None:
        fc = self.cfg.filters
        why = problem(row["pref"], row["kind"]) if "pref" in row else None
        if why is not None:
            raise Drop("filter", why)
        for name in self._required(row) if "pref" not in row else []:
            if name in row["missing"]:
                raise Drop("filter", f"missing:{name}")
            if name == "messages":
                roles = {m["role"] for m in row["messages"] if message_text(m).strip()}
                if not {"user", "assistant"} <= roles:
                    raise Drop("filter", "empty:messages (needs a non-empty user and assistant turn)")
            elif not field_text(row, name).strip():
                raise Drop("filter", f"empty:{name}")
        for bound, limits in (("min_chars", fc.min_chars), ("max_chars", fc.max_chars)):
            if limits is None:
                continue
            items = {"all": limits} if isinstance(limits, int) else limits
            for name, limit in items.items():
                n = len(field_text(row, name))
                if bound == "min_chars" and n < limit:
                    raise Drop("filter", f"min_chars:{name}<{limit}")
                if bound == "max_chars" and n > limit:
                    raise Drop("filter", f"max_chars:{name}>{limit}")
        if fc.min_tokens is not None or fc.max_tokens is not None:
            n_tok = len(self.tokenizer("\n".join(text_fields(row)), add_special_tokens=False)["input_ids"])
            if fc.min_tokens is not None and n_tok < fc.min_tokens:
                raise Drop("filter", f"min_tokens<{fc.min_tokens}")
            if fc.max_tokens is not None and n_tok > fc.max_tokens:
                raise Drop("filter", f"max_tokens>{fc.max_tokens}")
        if fc.max_repetition is not None:
            for text in text_fields(row):
                if repetition_ratio(text, self.cfg.dedup.char_ngram, self.cfg.dedup.word_ngram) > fc.max_repetition:
                    raise Drop("filter", f"repetition>{fc.max_repetition}")
        if fc.language is not None:
            lang = detect_language("\n".join(text_fields(row)))
            if lang != fc.language:
                raise Drop("filter", f"language:{lang or 'unknown'}!={fc.language}")

    def redact_payload(self, value: Any) -> Any:
        """Raw record content for quarantine, with PII redacted when redaction is on."""
        if not self.cfg.pii.enabled:
            return value
        if isinstance(value, str):
            return redact_pii(value, self.pii_types)[0]
        if isinstance(value, dict):
            return {k: self.redact_payload(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact_payload(v) for v in value]
        return value

    def dedup_text(self, row: dict[str, Any]) -> str:
        if "pref" in row:
            on = self.cfg.dedup.on or ("prompt" if row["kind"] == "prompt" else "row")
            label = f"\nlabel={row['pref']['label']}" if row["kind"] == "unpaired" else ""
            return prompt_user_text(row["pref"]) if on == "prompt" else "\n".join(text_fields(row)) + label
        if row["kind"] == "messages":
            return "\n".join(text_fields(row))
        if row["kind"] == "text":
            return row["fields"]["text"]
        return "\n".join(row["fields"].get(k, "") for k in self.cfg.dedup.fields)

    def process_one(self, rec: Record, row_id: str) -> dict[str, Any]:
        src = self.sources[rec.source]
        row = map_record(rec, src, row_id, self.cfg.kind)
        info: dict[str, Any] = {"normalised": False, "pii": {}}
        if self.cfg.normalise.enabled:
            info["normalised"] = _apply(row, lambda s: normalise(s, self.cfg.normalise))
        if self.cfg.pii.enabled:
            counts: Counter = Counter()

            def redact(s: str) -> str:
                new, c = redact_pii(s, self.pii_types)
                counts.update(c)
                return new

            _apply(row, redact)
            info["pii"] = dict(counts)
        info["length"] = sum(len(t) for t in text_fields(row))
        try:
            self._filter(row)
        except Drop as drop:
            drop.info = info  # rows dropped by a filter were still normalised/redacted: count them
            drop.row = public_row(row, rec.source)  # quarantine gets the redacted row, not the raw one
            raise
        return {"row": row, "info": info}

    def process(self, batch: list[tuple[int, str, Record]]) -> dict[str, Any]:
        """Batch of (rid, row_id, record) → outcomes in order, plus signatures of surviving rows."""
        outcomes = []
        texts = []
        for rid, row_id, rec in batch:
            try:
                res = self.process_one(rec, row_id)
            except Drop as drop:
                payload = drop.row or self.redact_payload(rec.data)
                outcomes.append(
                    {
                        "rid": rid,
                        "drop": (drop.stage, drop.reason),
                        "payload": _json_safe(payload),
                        "info": drop.info,
                    }
                )
                continue
            row = res["row"]
            dtext = self.dedup_text(row)
            outcomes.append(
                {
                    "rid": rid,
                    "row": row,
                    "info": res["info"],
                    "exact": xxhash.xxh64_intdigest(_WS.sub("", dtext.lower()).encode()),
                    "length": sum(len(t) for t in text_fields(row)),
                    "answer_length": len(answer_text(row)),
                }
            )
            texts.append(dtext)
        sigs = self.hasher.signatures(texts) if self.hasher is not None and texts else None
        return {"outcomes": outcomes, "sigs": sigs}


_WORKER: dict[str, RowProcessor] = {}


def init_worker(processor: RowProcessor) -> None:
    _WORKER["p"] = processor


def run_batch(batch):
    return _WORKER["p"].process(batch)
