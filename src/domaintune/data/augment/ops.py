"""The augmentation operations. Each returns new rows marked `origin: synthetic/<op>` with `derived_from`."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from domaintune.data.augment.config import (
    BackTranslateOp,
    BalanceOp,
    LexicalOp,
    ParaphraseOp,
    RecordsToDialogueOp,
    SyntheticQAOp,
)
from domaintune.data.augment.generator import GenerationError
from domaintune.data.ledger import Ledger, Where
from domaintune.data.minhash import LSHIndex, MinHasher
from domaintune.data.pii import redact_pii
from domaintune.data.text import detect_language, is_cjk, normalise_text, words
from domaintune.errors import UserError

_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SENT_END = re.compile(r"(?<=[.!?。！？；;])\s+|(?<=[。！？；])")
_QA_RE = re.compile(r"(?:question|问题)\s*[:：]\s*(.+?)\s*(?:answer|答案)\s*[:：]\s*(.+)", re.I | re.S)
_BULLET = re.compile(r"^\s*(?:\d+\s*[.)、:：]|[-*•]|(?:question|问题)\s*\d*\s*[:：])\s*", re.I)
_NEXT_Q = re.compile(r"\n\s*(?:question|问题)\s*[:：]", re.I)
_DEICTIC = re.compile(
    r"\b(?:the|this|that|above|given) (?:passage|text|paragraph|article)\b|(?:该|这个|这段|上述|上面的?)(?:段落|文章|文本|文字)|段落中",
    re.I,
)
_ROW_KEYS = {"id", "messages", "instruction", "input", "output", "text", "system", "history", "conversations"}


# ---- rows ---------------------------------------------------------------------------------------
def question_answer(row: dict[str, Any]) -> tuple[str, str]:
    """(user prompt, answer) of a row as spooled by the pipeline (messages, alpaca-like or text)."""
    if "messages" in row:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        return (users[-1] if users else ""), (answers[-1] if answers else "")
    if "text" in row and "instruction" not in row:
        return "", row["text"]
    q = row.get("instruction", "")
    if row.get("input"):
        q = f"{q}\n\n{row['input']}"
    return q, row.get("output", "")


def make_row(
    op: str,
    row_id: str,
    question: str,
    answer: str,
    parents: list[str],
    base: dict[str, Any] | None,
    source: str | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    out: dict[str, Any] = {"id": row_id, "messages": messages}
    extra = {k: v for k, v in (base or {}).items() if k not in _ROW_KEYS and k not in ("origin", "derived_from")}
    out.update(extra)
    out["source"] = source or (base or {}).get("source", "augment")
    out["origin"] = f"synthetic/{op}"
    out["derived_from"] = parents
    return out


def _rng(seed: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, xxhash.xxh64_intdigest(label.encode()) & 0xFFFFFFFF])


def pick(rows: list[dict[str, Any]], sources: list[str] | None, cap: int | None, seed: int, label: str) -> list:
    chosen = [r for r in rows if sources is None or r.get("source") in sources]
    if cap is not None and len(chosen) > cap:
        keep = sorted(_rng(seed, label).permutation(len(chosen))[:cap].tolist())
        chosen = [chosen[i] for i in keep]
    return chosen


# ---- checks -------------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    if is_cjk(text):
        return _CJK_CHAR.findall(text)
    return [w for w in words(text) if len(w) > 2 or w.isdigit()]


def overlap(answer: str, passage: str) -> float:
    """Share of the answer's words (Han characters for Chinese) that occur in the passage."""
    toks = _tokens(answer)
    if not toks:
        return 0.0
    have = set(_tokens(passage))
    return sum(t in have for t in toks) / len(toks)


def has_pii(text: str, types=None) -> list[str]:
    return sorted(redact_pii(text, types)[1])


class NearDupIndex:
    """MinHash-LSH (the data stage's own) over the train prompts; new texts are checked and then added."""

    def __init__(
        self, prompts: list[str], threshold: float, num_perm: int = 128, char_ngram: int = 5, word_ngram: int = 3
    ):
        self.hasher = MinHasher(num_perm, char_ngram, word_ngram)
        self.index = LSHIndex(threshold, num_perm)
        self.threshold = threshold
        self._n = 0
        for start in range(0, len(prompts), 4096):
            chunk = prompts[start : start + 4096]
            self.index.add_batch(self.hasher.signatures(chunk), [f"train:{start + i}" for i in range(len(chunk))])

    def check_add(self, text: str) -> float | None:
        """None when new (then remembered), else the similarity to the prompt it duplicates."""
        self._n += 1
        verdict = self.index.add_batch(self.hasher.signatures([text]), [f"new:{self._n}"])[0]
        return None if verdict.duplicate_of is None else verdict.similarity


def split_passages(text: str, max_chars: int, min_chars: int) -> list[str]:
    """Pack sentences (paragraph breaks respected) into passages of at most max_chars characters."""
    passages: list[str] = []
    for para in re.split(r"\n\s*\n|\n", text):
        para = para.strip()
        if not para:
            continue
        current = ""
        for sent in (s.strip() for s in _SENT_END.split(para)):
            if not sent:
                continue
            while len(sent) > max_chars:  # one over-long sentence: hard cut
                if current:
                    passages.append(current)
                    current = ""
                passages.append(sent[:max_chars])
                sent = sent[max_chars:]
            sep = "" if is_cjk(sent) else " "
            if current and len(current) + len(sep) + len(sent) > max_chars:
                passages.append(current)
                current = sent
            else:
                current = f"{current}{sep}{sent}" if current else sent
        if current:
            passages.append(current)
    # merge short neighbours so a list of short lines still forms passages
    merged: list[str] = []
    for p in passages:
        if merged and len(merged[-1]) < min_chars and len(merged[-1]) + 1 + len(p) <= max_chars:
            merged[-1] = f"{merged[-1]}\n{p}"
        else:
            merged.append(p)
    return [p for p in merged if len(p) >= min_chars]


# ---- the context shared by the ops ---------------------------------------------------------------
class OpResult:
    def __init__(self, op: str, index: int):
        self.op = op
        self.index = index
        self.rows: list[dict[str, Any]] = []
        self.sources: list[str] = []  # source row ids used (in order, unique)
        self._seen: set[str] = set()
        self.rejected: Counter = Counter()
        self.quarantined = 0
        self.failed = 0
        self.extra: dict[str, Any] = {}

    def used(self, row_id: str) -> None:
        if row_id not in self._seen:
            self._seen.add(row_id)
            self.sources.append(row_id)

    def summary(self, generator=None) -> dict[str, Any]:
        out = {
            "op": self.op,
            "index": self.index,
            "created": len(self.rows),
            "from_rows": len(self.sources),
            "source_ids": self.sources[:200],
            "source_ids_total": len(self.sources),
            "rejected": dict(self.rejected.most_common()),
            "failed": self.failed,
            "quarantined": self.quarantined,
            "examples": [_example(r) for r in self.rows[:3]],
        }
        out.update(self.extra)
        return out


def _example(row: dict[str, Any]) -> dict[str, Any]:
    q = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
    a = next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
    return {"id": row["id"], "derived_from": row["derived_from"][:3], "question": q, "answer": a[:400]}


class Context:
    def __init__(self, cfg, acfg, ledger: Ledger, progress, make_generator):
        self.cfg = cfg
        self.acfg = acfg
        self.ledger = ledger
        self.progress = progress
        self.seed = acfg.seed if acfg.seed is not None else cfg.seed
        self.pii_types = cfg.data.pii.types
        self._make_generator = make_generator
        self._generators: dict[str, Any] = {}

    def generator(self, gcfg=None):
        gcfg = gcfg or self.acfg.generator
        key = gcfg.model_dump_json()
        if key not in self._generators:
            self._generators[key] = self._make_generator(gcfg)
        return self._generators[key]

    def reject(self, res: OpResult, parent: dict[str, Any] | None, reason: str, candidate: Any = None) -> None:
        """A candidate that failed a check: counted, and kept in the quarantine for review."""
        res.rejected[reason.split(" (")[0]] += 1
        self._quarantine(res, parent, f"check failed: {reason}", candidate)

    def fail(self, res: OpResult, parent: dict[str, Any] | None, error: GenerationError, item: Any = None) -> None:
        res.failed += 1
        self._quarantine(res, parent, f"generator failed: {error}", item)

    def _quarantine(self, res: OpResult, parent, reason: str, payload: Any) -> None:
        source = (parent or {}).get("source", "augment")
        loc = (parent or {}).get("id", "")
        self.ledger.set_aside(
            Where(source, "augment", loc),
            f"augment/{res.op}",
            reason,
            book="augment",
            op_index=res.index,
            candidate=_redacted(payload),
        )
        res.quarantined += 1


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_pii(value)[0]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _lang_prompt(text: str, en: str, zh: str, **kw) -> str:
    return (zh if detect_language(text) == "zh" else en).format(**kw)


def _within(text: str, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= len(text) <= bounds[1]


# ---- records → dialogue -----------------------------------------------------------------------
def records_to_dialogue(ctx: Context, op: RecordsToDialogueOp, index: int, rows: list[dict]) -> OpResult:
    from jinja2 import StrictUndefined, TemplateError
    from jinja2.sandbox import SandboxedEnvironment

    from domaintune.data.readers import iter_source, source_name

    res = OpResult(op.op, index)
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
    templates = {k: env.from_string(getattr(op, k)) for k in ("instruction", "output", "system") if getattr(op, k)}
    name = source_name(op.source, index)
    keep = op.source.keep_map()
    seq = 0
    pii_counts: Counter = Counter()
    for rec in iter_source(op.source, index, ctx.cfg.base_dir):
        seq += 1
        rid = f"{name}-{seq:06d}"
        parent = {"id": rid, "source": name}
        if rec.error is not None:
            ctx.reject(res, parent, f"unparseable record at {rec.file}: {rec.loc}: {rec.error}", rec.raw)
            continue
        data = rec.data or {}
        if op.source.fields.id and data.get(op.source.fields.id) not in (None, ""):
            rid = f"{name}-{data[op.source.fields.id]}"
            parent["id"] = rid
        rendered = {}
        try:
            for key, tmpl in templates.items():
                rendered[key] = normalise_text(tmpl.render(**data))
        except TemplateError as e:
            ctx.reject(res, parent, f"template {key!r} on {rec.file}: {rec.loc}: {e}", data)
            continue
        if not rendered["instruction"] or not rendered["output"]:
            ctx.reject(res, parent, f"empty instruction/output after rendering ({rec.file}: {rec.loc})", data)
            continue
        if ctx.cfg.data.pii.enabled:
            for key in list(rendered):
                rendered[key], counts = redact_pii(rendered[key], ctx.pii_types)
                pii_counts.update(counts)
        extras = {k: data[path] for k, path in keep.items() if path in data}
        res.used(rid)
        res.rows.append(
            make_row(
                op.op,
                f"{rid}-r2d",
                rendered["instruction"],
                rendered["output"],
                [rid],
                extras,
                source=name,
                system=rendered.get("system"),
            )
        )
        if op.max_rows is not None and len(res.rows) >= op.max_rows:
            break
    res.extra["pii_redacted"] = dict(pii_counts)
    return res


# ---- synthetic Q&A ------------------------------------------------------------------------------
QA_PROMPT_EN = (
    "Read the passage. Write one question that the passage answers, then answer it using only facts "
    "from the passage.\nReply in exactly this form:\nQuestion: <the question>\nAnswer: <the answer>\n\n"
    "Passage:\n{passage}"
)
QA_PROMPT_ZH = (
    "阅读下面的段落。提出一个该段落能够回答的问题，然后只用段落中的事实回答。\n严格按以下格式回复：\n"
    "问题：<问题>\n答案：<答案>\n\n段落：\n{passage}"
)


def synthetic_qa(ctx: Context, op: SyntheticQAOp, index: int, rows: list[dict], prompts: list[str]) -> OpResult:
    res = OpResult(op.op, index)
    docs = pick(rows, op.sources, op.max_rows, ctx.seed, f"synthetic_qa:{index}")
    passages: list[tuple[dict, int, str]] = []
    seen_passages: set[int] = set()
    for row in docs:
        q, a = question_answer(row)
        text = {"output": a, "text": row.get("text", a), "instruction": q}[op.field]
        for k, p in enumerate(split_passages(text or "", op.passage_chars, op.min_passage_chars)):
            h = xxhash.xxh64_intdigest(p.encode())
            if h not in seen_passages:  # the same boilerplate passage in many answers is used once
                seen_passages.add(h)
                passages.append((row, k, p))
    if op.max_passages is not None and len(passages) > op.max_passages:
        keep = sorted(_rng(ctx.seed, f"passages:{index}").permutation(len(passages))[: op.max_passages].tolist())
        passages = [passages[i] for i in keep]
    res.extra["passages"] = len(passages)
    items = [
        [{"role": "user", "content": _lang_prompt(p, QA_PROMPT_EN, QA_PROMPT_ZH, passage=p)}] for _, _, p in passages
    ]
    outputs = ctx.generator().generate(items, ctx.progress, f"augment[{index}] synthetic_qa")
    dedup = NearDupIndex(prompts, op.near_dup_threshold)
    parsed = 0
    for (row, k, passage), text in zip(passages, outputs):
        parent = row
        if isinstance(text, GenerationError):
            ctx.fail(res, parent, text, {"passage": passage})
            continue
        m = _QA_RE.search(text)
        if not m:
            ctx.reject(res, parent, "unparseable output (no Question:/Answer:)", {"passage": passage, "output": text})
            continue
        parsed += 1
        question = m.group(1).strip()
        answer = _NEXT_Q.split(m.group(2), maxsplit=1)[0].strip()  # small models repeat the pattern: first pair only
        cand = {"passage": passage, "question": question, "answer": answer}
        reason = qa_check(op, question, answer, passage, ctx.pii_types)
        if reason is None:
            sim = dedup.check_add(question)
            if sim is not None:
                reason = f"question near-duplicate of a prompt (Jaccard≈{sim:.2f})"
        if reason is not None:
            ctx.reject(res, parent, reason, cand)
            continue
        res.used(row["id"])
        new = make_row(op.op, f"{row['id']}-qa{k}", question, answer, [row["id"]], row)
        new["passage"] = passage
        res.rows.append(new)
    res.extra["pairs_parsed"] = parsed
    return res


def qa_check(op: SyntheticQAOp, question: str, answer: str, passage: str, pii_types=None) -> str | None:
    """None when the pair passes; else the first failed check."""
    if _DEICTIC.search(question):
        return "question refers to the passage (does not stand alone)"
    if not _within(question, op.question_chars):
        return f"question length {len(question)} outside {list(op.question_chars)}"
    if not _within(answer, op.answer_chars):
        return f"answer length {len(answer)} outside {list(op.answer_chars)}"
    ov = overlap(answer, passage)
    if ov < op.min_overlap:
        return f"answer not grounded in the passage (overlap {ov:.2f} < {op.min_overlap})"
    pii = has_pii(question + "\n" + answer, pii_types)
    if pii:
        return f"PII in the pair ({', '.join(pii)})"
    return None


# ---- paraphrases ----------------------------------------------------------------------------------
PARA_PROMPT_EN = (
    "Rewrite the question below in {n} different ways that keep its meaning. Write one question per line, "
    "without numbering and without answering it.\n\nQuestion: {q}"
)
PARA_PROMPT_ZH = "用{n}种不同的说法改写下面的问题，意思保持不变。每行写一个问题，不要编号，不要回答。\n\n问题：{q}"


def paraphrase(ctx: Context, op: ParaphraseOp, index: int, rows: list[dict], prompts: list[str]) -> OpResult:
    res = OpResult(op.op, index)
    chosen = [
        r for r in pick(rows, op.sources, op.max_rows, ctx.seed, f"paraphrase:{index}") if all(question_answer(r))
    ]
    items = [
        [
            {
                "role": "user",
                "content": _lang_prompt(
                    question_answer(r)[0], PARA_PROMPT_EN, PARA_PROMPT_ZH, n=op.n, q=question_answer(r)[0]
                ),
            }
        ]
        for r in chosen
    ]
    outputs = ctx.generator().generate(items, ctx.progress, f"augment[{index}] paraphrase")
    dedup = NearDupIndex(prompts, op.near_dup_threshold)
    for row, text in zip(chosen, outputs):
        if isinstance(text, GenerationError):
            ctx.fail(res, row, text, {"question": question_answer(row)[0]})
            continue
        q, a = question_answer(row)
        lines = [_BULLET.sub("", ln).strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln][: op.n]
        if not lines:
            ctx.reject(res, row, "empty output", {"output": text})
        for k, cand in enumerate(lines):
            reason = _rewrite_check(cand, q, ctx.pii_types) or _dup(dedup, cand)
            if reason:
                ctx.reject(res, row, reason, {"question": q, "candidate": cand})
                continue
            res.used(row["id"])
            res.rows.append(make_row(op.op, f"{row['id']}-para{k}", cand, a, [row["id"]], row))
    return res


def _rewrite_check(cand: str, original: str, pii_types=None) -> str | None:
    if cand.strip() == original.strip():
        return "identical to the original"
    if len(cand) < 5 or len(cand) > 3 * len(original) + 50:
        return f"length {len(cand)} out of bounds for an original of {len(original)}"
    if detect_language(cand) != detect_language(original):
        return f"language {detect_language(cand)} differs from the original's {detect_language(original)}"
    pii = has_pii(cand, pii_types)
    if pii:
        return f"PII in the output ({', '.join(pii)})"
    return None


def _dup(dedup: NearDupIndex, text: str) -> str | None:
    sim = dedup.check_add(text)
    return None if sim is None else f"near-duplicate of a prompt (Jaccard≈{sim:.2f})"


# ---- back-translation -------------------------------------------------------------------------
TRANSLATE_PROMPT = "Translate the following text into {lang}. Output only the translation.\n\n{text}"
_LANG = {"en": "English", "zh": "Chinese (简体中文)"}


def back_translate(ctx: Context, op: BackTranslateOp, index: int, rows: list[dict], prompts: list[str]) -> OpResult:
    res = OpResult(op.op, index)
    gen = ctx.generator(op.translator)
    chosen = [
        r for r in pick(rows, op.sources, op.max_rows, ctx.seed, f"back_translate:{index}") if all(question_answer(r))
    ]
    plan = []
    for r in chosen:
        q = question_answer(r)[0]
        src_lang = detect_language(q) or "en"
        pivot = op.pivot if op.pivot != "auto" else ("en" if src_lang == "zh" else "zh")
        if pivot == src_lang:
            ctx.reject(res, r, f"question already in the pivot language {pivot}", {"question": q})
            continue
        plan.append((r, q, src_lang, pivot))
    there = gen.generate(
        [[{"role": "user", "content": TRANSLATE_PROMPT.format(lang=_LANG[p], text=q)}] for _, q, _, p in plan],
        ctx.progress,
        f"augment[{index}] translate →pivot",
    )
    back_plan = []
    for (r, q, src, pivot), mid in zip(plan, there):
        if isinstance(mid, GenerationError):
            ctx.fail(res, r, mid, {"question": q})
        elif not mid or detect_language(mid) != pivot:
            ctx.reject(res, r, f"pivot translation is not {pivot}", {"question": q, "pivot": mid})
        else:
            back_plan.append((r, q, src, mid))
    back = gen.generate(
        [
            [{"role": "user", "content": TRANSLATE_PROMPT.format(lang=_LANG[src], text=mid)}]
            for _, _, src, mid in back_plan
        ],
        ctx.progress,
        f"augment[{index}] translate ←back",
    )
    dedup = NearDupIndex(prompts, op.near_dup_threshold)
    for (r, q, _, mid), text in zip(back_plan, back):
        if isinstance(text, GenerationError):
            ctx.fail(res, r, text, {"question": q, "pivot": mid})
            continue
        reason = _rewrite_check(text, q, ctx.pii_types) or _dup(dedup, text)
        if reason:
            ctx.reject(res, r, reason, {"question": q, "pivot": mid, "candidate": text})
            continue
        res.used(r["id"])
        new = make_row(op.op, f"{r['id']}-bt", text, question_answer(r)[1], [r["id"]], r)
        new["pivot"] = mid
        res.rows.append(new)
    return res


# ---- lexical (EDA) --------------------------------------------------------------------------------
def load_glossary(value) -> dict[str, list[str]]:
    """{term: [synonyms]} → symmetric groups: each member maps to the others."""
    if value is None:
        return {}
    if isinstance(value, dict):
        raw = value
    else:
        path = Path(value)
        if not path.exists():
            raise UserError(f"data.augment lexical glossary: {path} not found")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as e:
            raise UserError(f"{path}: cannot parse glossary: {e}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise UserError(f"{path}: a glossary is a mapping of term → list of synonyms")
    groups: dict[str, list[str]] = {}
    for term, syns in raw.items():
        members = [str(term)] + [str(s) for s in syns]
        for m in members:
            groups.setdefault(m.lower(), [])
            groups[m.lower()].extend(x for x in members if x.lower() != m.lower() and x not in groups[m.lower()])
    return groups


def _segment(text: str, zh: bool, glossary: dict[str, list[str]]) -> list[str]:
    if zh:
        import jieba

        jieba.setLogLevel(60)
        for term in glossary:
            if _CJK_CHAR.search(term):
                jieba.add_word(term)
        return [t for t in jieba.lcut(text) if t.strip()]
    return text.split()


def eda(tokens: list[str], method: str, rate: float, rng: random.Random, glossary: dict[str, list[str]]) -> list[str]:
    toks = list(tokens)
    if method == "synonym":
        spots = [i for i, t in enumerate(toks) if t.lower().strip(".,;:!?()\"'") in glossary]
        if not spots:
            return toks
        n = max(1, round(rate * len(toks)))
        for i in rng.sample(spots, min(n, len(spots))):
            core = toks[i].strip(".,;:!?()\"'")
            toks[i] = toks[i].replace(core, rng.choice(glossary[core.lower()]))
        return toks
    if method == "swap":
        if len(toks) < 2:
            return toks
        for _ in range(max(1, round(rate * len(toks)))):
            a, b = rng.sample(range(len(toks)), 2)
            toks[a], toks[b] = toks[b], toks[a]
        return toks
    if method == "delete":
        if len(toks) < 2:
            return toks
        kept = [t for t in toks if rng.random() >= rate]
        if len(kept) == len(toks):  # delete at least one word
            kept.pop(rng.randrange(len(kept)))
        return kept or [rng.choice(toks)]
    raise ValueError(method)


def lexical(ctx: Context, op: LexicalOp, index: int, rows: list[dict]) -> OpResult:
    res = OpResult(op.op, index)
    glossary = load_glossary(op.glossary)
    for row in pick(rows, op.sources, op.max_rows, ctx.seed, f"lexical:{index}"):
        q, a = question_answer(row)
        if not q or not a:
            continue
        zh = is_cjk(q)
        tokens = _segment(q, zh, glossary)
        rng = random.Random(f"{ctx.seed}:{index}:{row['id']}")
        seen = {q}
        for k in range(op.n):
            method = op.methods[k % len(op.methods)]
            new_tokens = eda(tokens, method, op.rate, rng, glossary)
            text = ("" if zh else " ").join(new_tokens)
            if text in seen:
                ctx.reject(res, row, f"{method}: no change", {"question": q})
                continue
            seen.add(text)
            res.used(row["id"])
            new = make_row(op.op, f"{row['id']}-eda{k}", text, a, [row["id"]], row)
            new["eda"] = method
            res.rows.append(new)
    return res


# ---- class balance ------------------------------------------------------------------------------
def balance(ctx: Context, op: BalanceOp, index: int, rows: list[dict]) -> OpResult:
    res = OpResult(op.op, index)
    strata: dict[str, list[dict]] = {}
    for r in rows:
        if r.get(op.field) not in (None, ""):
            strata.setdefault(str(r[op.field]), []).append(r)
    if not strata:
        raise UserError(f"data.augment.ops[{index}] balance: no train row has field {op.field!r}")
    total = len(rows)
    before = {k: len(v) for k, v in strata.items()}
    t = op.target_share
    rng = _rng(ctx.seed, f"balance:{index}")
    for key in sorted(strata, key=lambda k: (len(strata[k]), k)):
        members = strata[key]
        n = len(members)
        need = int(np.ceil((t * total - n) / (1 - t))) if n < t * total else 0
        need = min(need, int(op.max_factor * n) - n)
        for j in range(max(0, need)):
            src = members[int(rng.integers(n))]
            res.used(src["id"])
            copy = make_row(op.op, f"{src['id']}-bal{j}", *question_answer(src), [src["id"]], src)
            res.rows.append(copy)
        total += max(0, need)
    after = Counter(before)
    for r in res.rows:
        after[str(r[op.field])] += 1
    res.extra["field"] = op.field
    res.extra["shares_before"] = {k: round(v / len(rows), 4) for k, v in sorted(before.items())}
    res.extra["shares_after"] = {k: round(v / total, 4) for k, v in sorted(after.items())}
    return res
