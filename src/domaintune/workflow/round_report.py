"""A round's figures: the child against its parent (and the base) item by item, the summary, the webhook."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from domaintune.utils.io import read_jsonl, write_json

log = logging.getLogger(__name__)

TEXT_METRICS = ("rouge1_char", "rougeL_char", "rougeL_word", "bleu", "chrf", "token_f1", "exact_match")


def compare(
    items_file: Path,
    child: str,
    parent: str,
    *,
    primary: str,
    samples: int,
    seed: int,
    report_file: Path | None = None,
) -> dict[str, Any]:
    """Child minus parent (and child minus base) on the `test` items of an eval run, with paired bootstrap CIs."""
    from domaintune.eval.stats import paired_bootstrap_delta

    rows = [r for r in read_jsonl(items_file) if r.get("set") == "test"]
    out: dict[str, Any] = {"n_items": len(rows), "child": child, "parent": parent, "metrics": {}}
    for metric in dict.fromkeys((primary, *TEXT_METRICS)):
        scores = {m: [_num((r["scores"].get(m) or {}).get(metric)) for r in rows] for m in (child, parent, "base")}
        paired = [(p, c) for p, c in zip(scores[parent], scores[child]) if p is not None and c is not None]
        if not paired:
            continue
        d = paired_bootstrap_delta([p for p, _ in paired], [c for _, c in paired], samples=samples, seed=seed)
        entry = {"parent": _mean(scores[parent]), "child": _mean(scores[child]), "base": _mean(scores["base"]), **d}
        out["metrics"][metric] = {k: _clean(v) for k, v in entry.items()}
    if primary in out["metrics"]:
        out["primary"] = {"metric": primary, **out["metrics"][primary]}
    if report_file is not None and report_file.is_file():
        aggregate = (json.loads(report_file.read_text(encoding="utf-8")).get("metrics") or {}).get("test") or {}
        ppl = {m: (aggregate.get(name) or {}).get("perplexity") for m, name in (("parent", parent), ("child", child))}
        ppl["base"] = (aggregate.get("base") or {}).get("perplexity")
        if any(v is not None for v in ppl.values()):
            out["perplexity"] = ppl
    return out


def parent_gate_failures(comparison: dict[str, Any]) -> list[str]:
    """The child must not be worse than its parent on the test set: the primary metric's 95% CI lies below 0."""
    primary = (comparison.get("test") or {}).get("primary") or {}
    high = primary.get("ci_high")
    if high is None or high >= 0:
        return []
    return [
        f"child worse than its parent on the test set: {primary['metric']} {primary['parent']:.2f} -> "
        f"{primary['child']:.2f} (delta {primary['delta']:+.2f}, 95% CI [{primary['ci_low']:+.2f}, {high:+.2f}])"
    ]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(float(value)) else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _clean(value: Any) -> Any:
    """NaN (an interval of one item) as None, so the JSON stays JSON."""
    return None if isinstance(value, float) and math.isnan(value) else value


# ---------------------------------------------------------------------- summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The round in a few lines, for the terminal, the log and the webhook's `text`."""
    lines = [f"round {summary.get('round') or '-'}: {summary['status']}: {summary['message']}"]
    feedback = summary.get("feedback") or {}
    if feedback:
        taken = (
            f"{feedback['train_rows']} trained, {feedback['holdout_rows']} held out"
            if "train_rows" in feedback
            else f"{feedback.get('candidates', 0)} pass the review rules"
        )
        lines.append(
            f"feedback: {feedback.get('rows_in_window', 0)} rows on {feedback.get('requests', 0)} requests in the "
            f"window; {taken}, {feedback.get('dropped_total', 0)} dropped {feedback.get('dropped') or ''}".rstrip()
        )
    rows = summary.get("rows") or {}
    if rows:
        lines.append(
            f"data: {rows.get('parent_train')} parent rows + {rows.get('new_rows')} new = {rows.get('train')} "
            f"training rows; test {rows.get('test')} rows (the parent's, unchanged)"
        )
    for set_name, comparison in (summary.get("comparison") or {}).items():
        p = comparison.get("primary") or {}
        if p:
            lines.append(
                f"{set_name} ({comparison['n_items']} items) {p['metric']}: base {_fmt(p.get('base'))}, parent "
                f"{_fmt(p.get('parent'))}, child {_fmt(p.get('child'))}; child - parent {p['delta']:+.2f} "
                f"[{_fmt(p.get('ci_low'), '+.2f')}, {_fmt(p.get('ci_high'), '+.2f')}]"
            )
    gates = summary.get("gates")
    if gates:
        lines.append("gates: passed" if gates["passed"] else "gates: FAILED: " + "; ".join(gates["failures"]))
    canary = summary.get("canary")
    if canary:
        lines.append(f"canary: {canary.get('message')}")
    return lines


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def write_summary(rounds_dir: Path, folder: Path | None, summary: dict[str, Any]) -> None:
    """`<round>/round/summary.json`, `rounds/latest.json` and one line of `rounds/history.jsonl`."""
    if folder is not None:
        write_json(folder / "round" / "summary.json", summary)
    write_json(rounds_dir / "latest.json", summary)
    with (rounds_dir / "history.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(summary, ensure_ascii=False, default=str) + "\n")


def notify(url: str | None, summary: dict[str, Any]) -> str | None:
    """POST the summary (and a Slack-style `text`) to a webhook; the error text when it failed, else None."""
    if not url:
        return None
    import httpx

    payload = {"text": "\n".join(summary_lines(summary)), "round": summary}
    try:
        response = httpx.post(
            url, content=json.dumps(payload, default=str), timeout=15.0, headers={"Content-Type": "application/json"}
        )
        response.raise_for_status()
    except httpx.HTTPError as exc:
        log.warning("round webhook %s failed: %s", url, exc)
        return f"{type(exc).__name__}: {exc}"
    return None
