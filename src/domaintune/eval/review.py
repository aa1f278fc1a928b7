"""Blind expert review: export pairs of answers in random A/B order, import reviewers' choices.

export writes, in `<run>/eval/review/`:
- review.csv: review_id, item_id, question, [reference,] answer_a, answer_b, reviewer, choice, comment
  (fill `choice` with A, B or tie in a spreadsheet), and
- review.html: the same items as a self-contained form; reviewers click A/B/tie and download a CSV;
- review_key.json: which model is A and which is B for every item (kept away from reviewers).
import reads one or more filled CSVs and reports each model's win rate with a 95% CI and Cohen's
kappa between each pair of reviewers.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from domaintune.errors import UserError
from domaintune.eval.stats import cohen_kappa
from domaintune.layout import RunLayout
from domaintune.utils.io import atomic_write, read_jsonl, write_json

KAPPA_WARN = 0.85
CHOICES = ("A", "B", "tie")


def export_review(
    layout: RunLayout,
    n_items: int = 30,
    model_a: str = "base",
    model_b: str = "tuned",
    seed: int = 0,
    show_reference: bool = False,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    items_path = layout.eval_items
    if not items_path.is_file():
        raise UserError(f"{items_path} does not exist: run `domaintune eval CONFIG` first")
    rows = [r for r in read_jsonl(items_path) if r.get("set") == "test"]
    for model in (model_a, model_b):
        if not rows or model not in rows[0]["answers"]:
            have = sorted(rows[0]["answers"]) if rows else []
            raise UserError(f"model {model!r} has no answers in {items_path} (have {have})")
    if model_a == model_b:
        raise UserError("review needs two different models")
    rng = random.Random(seed)
    chosen = rows if len(rows) <= n_items else rng.sample(rows, n_items)
    review_id = hashlib.sha256(
        f"{items_path.resolve()}:{model_a}:{model_b}:{seed}:{time.time_ns()}".encode()
    ).hexdigest()[:12]
    key: dict[str, Any] = {"review_id": review_id, "models": [model_a, model_b], "items": {}}
    records = []
    for row in chosen:
        flip = rng.random() < 0.5
        a, b = (model_b, model_a) if flip else (model_a, model_b)
        key["items"][row["id"]] = {"A": a, "B": b}
        question = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        record = {"review_id": review_id, "item_id": row["id"], "question": question}
        if show_reference:
            record["reference"] = row["reference"]
        record.update(answer_a=row["answers"][a], answer_b=row["answers"][b], reviewer="", choice="", comment="")
        records.append(record)
    out_dir = Path(out_dir or layout.review_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "review.csv", encoding="utf-8-sig") as handle:  # BOM: Excel reads UTF-8 Chinese
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    (out_dir / "review.html").write_text(_review_html(records, review_id, show_reference), encoding="utf-8")
    write_json(out_dir / "review_key.json", key)
    return {
        "review_id": review_id,
        "n_items": len(records),
        "csv": str(out_dir / "review.csv"),
        "html": str(out_dir / "review.html"),
        "key": str(out_dir / "review_key.json"),
    }


def _review_html(records: list[dict], review_id: str, show_reference: bool) -> str:
    blocks = []
    for k, r in enumerate(records):
        ref = (
            f"<details><summary>reference</summary><pre>{html.escape(r['reference'])}</pre></details>"
            if show_reference
            else ""
        )
        radios = "".join(
            f'<label><input type="radio" name="c{k}" value="{c}"> {c if c != "tie" else "tie / equal"}</label> '
            for c in CHOICES
        )
        blocks.append(
            f'<div class="item" data-id="{html.escape(r["item_id"])}"><h3>{k + 1}. {html.escape(r["item_id"])}</h3>'
            f"<pre class=q>{html.escape(r['question'])}</pre>{ref}"
            f'<div class="pair"><div><b>A</b><pre>{html.escape(r["answer_a"])}</pre></div>'
            f"<div><b>B</b><pre>{html.escape(r['answer_b'])}</pre></div></div>"
            f'<div>Better answer: {radios}<input class="comment" placeholder="comment (optional)" size="50"></div></div>'
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Blind review {review_id}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}.item{{border-top:1px solid #ccc;padding:0.5em 0}}
.pair{{display:flex;gap:1em}}.pair>div{{flex:1;background:#f7f7f7;padding:0.5em}}pre{{white-space:pre-wrap}}
.q{{background:#eef4ff;padding:0.5em}}#status{{color:#555}}</style></head><body>
<h1>Blind review</h1><p>For each question pick the better answer (A or B) or "tie". The answers come from two models
in random order. When done, press <b>Download CSV</b> and send the file back.</p>
<p>Your name: <input id="reviewer" placeholder="reviewer name"> <span id="status"></span></p>
{"".join(blocks)}
<p><button id="dl">Download CSV</button></p>
<script>
const REVIEW_ID = {json.dumps(review_id)};
function q(v) {{ v = String(v ?? ""); return /[",\\n\\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }}
function update() {{
  const items = document.querySelectorAll('.item'); let done = 0;
  items.forEach((el, k) => {{ if (el.querySelector('input[name=c' + k + ']:checked')) done++; }});
  document.getElementById('status').textContent = done + ' / ' + items.length + ' answered';
}}
document.addEventListener('change', update); update();
document.getElementById('dl').onclick = () => {{
  const reviewer = document.getElementById('reviewer').value.trim();
  if (!reviewer) {{ alert('Please enter your name first.'); return; }}
  const lines = ['review_id,item_id,reviewer,choice,comment'];
  document.querySelectorAll('.item').forEach((el, k) => {{
    const c = el.querySelector('input[name=c' + k + ']:checked');
    lines.push([REVIEW_ID, el.dataset.id, reviewer, c ? c.value : '', el.querySelector('.comment').value].map(q).join(','));
  }});
  const blob = new Blob(['\\ufeff' + lines.join('\\r\\n') + '\\r\\n'], {{type: 'text/csv;charset=utf-8'}});
  const a = document.createElement('a'); a.href = URL.createObjectURL(blob);
  a.download = 'review-' + REVIEW_ID + '-' + reviewer.replace(/[^\\w-]+/g, '_') + '.csv'; a.click();
}};
</script></body></html>
"""


def _read_choices(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path}: review file not found")
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    needed = {"item_id", "choice"}
    if not reader.fieldnames or not needed <= set(reader.fieldnames):
        raise UserError(f"{path}: needs columns item_id and choice (got {reader.fieldnames})")
    rows = []
    for line_no, row in enumerate(reader, start=2):
        choice = (row.get("choice") or "").strip()
        if not choice:
            continue  # unanswered
        norm = {"a": "A", "b": "B", "tie": "tie", "t": "tie", "=": "tie", "equal": "tie"}.get(choice.lower())
        if norm is None:
            raise UserError(f"{path}:{line_no}: choice {choice!r} must be A, B or tie")
        reviewer = (row.get("reviewer") or "").strip() or path.stem
        rows.append(
            {
                "item_id": row["item_id"],
                "choice": norm,
                "reviewer": reviewer,
                "review_id": (row.get("review_id") or "").strip(),
                "where": f"{path}:{line_no}",
            }
        )
    return rows


def _find_key(files: list[Path], key_path: Path | None) -> Path:
    if key_path:
        if not Path(key_path).is_file():
            raise UserError(f"--key {key_path}: file not found")
        return Path(key_path)
    for f in files:
        candidate = f.parent / "review_key.json"
        if candidate.is_file():
            return candidate
    raise UserError("cannot find review_key.json beside the review files; pass --key <run>/eval/review/review_key.json")


def import_review(files: list[Path], key_path: Path | None = None, seed: int = 0, samples: int = 2000) -> dict:
    files = [Path(f) for f in files]
    if not files:
        raise UserError("import-review needs at least one reviewer file")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: review file not found")
    key_file = _find_key(files, key_path)
    key = json.loads(key_file.read_text(encoding="utf-8"))
    judgements = _judgements(files, key, key_file)
    items = sorted({i for per in judgements.values() for i in per})
    agreement, warnings = _agreement(judgements)
    return {
        "review_id": key["review_id"],
        "models": key["models"],
        "reviewers": {r: len(per) for r, per in sorted(judgements.items())},
        "n_items": len(items),
        "win_rates": _win_rates(judgements, key["models"], items, seed, samples),
        "agreement": agreement,
        "warnings": warnings,
        "note": "win rate counts a tie as half a win; 95% CI by bootstrap over items",
    }


def _judgements(files: list[Path], key: dict[str, Any], key_file: Path) -> dict[str, dict[str, str]]:
    """reviewer -> item -> the winning model or "tie", with each A/B choice unblinded through the key."""
    judgements: dict[str, dict[str, str]] = defaultdict(dict)
    for f in files:
        for row in _read_choices(f):
            if row["review_id"] and row["review_id"] != key["review_id"]:
                raise UserError(
                    f"{row['where']}: review_id {row['review_id']} does not match {key_file} ({key['review_id']})"
                )
            mapping = key["items"].get(row["item_id"])
            if mapping is None:
                raise UserError(f"{row['where']}: item {row['item_id']!r} is not in {key_file}")
            winner = "tie" if row["choice"] == "tie" else mapping[row["choice"]]
            previous = judgements[row["reviewer"]].get(row["item_id"])
            if previous is not None and previous != winner:
                raise UserError(
                    f"{row['where']}: reviewer {row['reviewer']!r} rated item {row['item_id']} twice "
                    "with different choices"
                )
            judgements[row["reviewer"]][row["item_id"]] = winner
    if not any(judgements.values()):
        raise UserError("no answered items in the review files (the choice column is empty)")
    return judgements


def _win_rates(
    judgements: dict[str, dict[str, str]], models: list[str], items: list[str], seed: int, samples: int
) -> dict[str, Any]:
    """Per item: the average outcome over reviewers (1 win, 0.5 tie, 0 loss); bootstrapped over items."""
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    for model in models:
        per_item = []
        wins = ties = losses = 0
        for item in items:
            outcomes = []
            for per in judgements.values():
                w = per.get(item)
                if w is None:
                    continue
                outcomes.append(1.0 if w == model else 0.5 if w == "tie" else 0.0)
                wins += w == model
                ties += w == "tie"
                losses += w not in (model, "tie")
            per_item.append(float(np.mean(outcomes)))
        arr = np.asarray(per_item)
        boots = arr[rng.integers(0, arr.size, size=(samples, arr.size))].mean(axis=1)
        low, high = np.quantile(boots, [0.025, 0.975])
        results[model] = {
            "win_rate": float(arr.mean()),
            "ci_low": float(low),
            "ci_high": float(high),
            "wins": int(wins),
            "ties": int(ties),
            "losses": int(losses),
        }
    return results


def _agreement(judgements: dict[str, dict[str, str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Cohen's kappa of every pair of reviewers on the items both rated, and warnings where they disagree."""
    agreement = []
    warnings = []
    for r1, r2 in combinations(sorted(judgements), 2):
        common = sorted(set(judgements[r1]) & set(judgements[r2]))
        kappa = (
            cohen_kappa([judgements[r1][i] for i in common], [judgements[r2][i] for i in common]) if common else None
        )
        agreement.append({"reviewers": [r1, r2], "n_items": len(common), "kappa": kappa})
        if kappa is None:
            warnings.append(f"kappa {r1} vs {r2}: undefined ({len(common)} common items, or a single category)")
        elif kappa < KAPPA_WARN:
            warnings.append(
                f"kappa {r1} vs {r2} = {kappa:.2f} < {KAPPA_WARN}: reviewers disagree; "
                "tighten the guidelines or add reviewers"
            )
    return agreement, warnings
