"""The end-of-run summary: a rich table on the terminal and `run/summary.html` linking every report."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from domaintune.utils.io import atomic_write
from domaintune.workflow.pipeline import RunResult

STAGE_REPORTS = {
    "data": ["data/report.html", "data/report.json"],
    "train": ["train/loss.png", "train/metrics.json"],
    "eval": ["eval/report.html", "eval/report.json"],
    "export": ["export/manifest.json"],
    "register": ["run/registered.json"],
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect_figures(output_dir: Path) -> list[tuple[str, str]]:
    """(label, value) pairs read from each stage's own report; absent reports are left out, not invented."""
    figures: list[tuple[str, str]] = []
    data = _load(output_dir / "data" / "report.json")
    if data:
        totals = data.get("totals", {})
        if totals:
            figures.append(("rows in / kept / dropped",
                            f"{totals.get('input', '?')} / {totals.get('kept', '?')} / {totals.get('dropped', '?')}"))
        splits = data.get("splits", {})
        if splits:
            sizes = {name: (v.get("rows") if isinstance(v, dict) else v) for name, v in splits.items()}
            figures.append(("split sizes", ", ".join(f"{k} {v}" for k, v in sizes.items())))
    train = _load(output_dir / "train" / "metrics.json")
    if train:
        for key, label in (("initial_val_loss", "val loss at step 0"), ("best_val_loss", "best val loss"),
                           ("final_train_loss", "final train loss"), ("tokens_per_second", "training tokens/s"),
                           ("wall_time_seconds", "training wall time (s)")):
            if key in train and train[key] is not None:
                value = train[key]
                figures.append((label, f"{value:.4g}" if isinstance(value, float) else str(value)))
    report = _load(output_dir / "eval" / "report.json")
    if report:
        for name, delta in (report.get("deltas") or {}).items():
            if isinstance(delta, dict) and "delta" in delta:
                ci = delta.get("ci95") or [None, None]
                interval = f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if None not in ci else ""
                figures.append((f"Δ {name} (tuned − base)", f"{delta['delta']:+.4g}{interval}"))
        if report.get("retention") is not None:
            retention = report["retention"]
            value = retention.get("value") if isinstance(retention, dict) else retention
            if value is not None:
                figures.append(("retention on the general set", f"{value:.3f}"))
        gates = report.get("gates", {})
        if gates:
            figures.append(("eval gates", "passed" if gates.get("passed") else "FAILED: " + "; ".join(gates.get("failures", []))))
    registered = _load(output_dir / "run" / "registered.json")
    if registered:
        figures.append(("registered version", f"{registered['version']} ({registered['status']})"))
    return figures


def print_summary(result: RunResult, console: Console) -> None:
    stages = Table("stage", "status", "seconds", title=f"run {result.output_dir}")
    for outcome in result.outcomes:
        stages.add_row(outcome.name, outcome.status + (f" ({outcome.reason})" if outcome.reason else ""),
                       f"{outcome.seconds:.1f}")
    console.print(stages)
    figures = Table("figure", "value", title="results")
    for label, value in collect_figures(result.output_dir):
        figures.add_row(label, value)
    console.print(figures)


def write_summary_html(result: RunResult) -> Path:
    out = result.output_dir
    rows = "".join(
        f"<tr><td>{html.escape(o.name)}</td><td>{html.escape(o.status)}</td><td>{o.seconds:.1f}</td>"
        f"<td>{' '.join(_link(out, rel) for rel in STAGE_REPORTS[o.name])}</td></tr>"
        for o in result.outcomes
    )
    figures = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in collect_figures(out))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>domaintune run summary</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:left}}th{{background:#f3f3f3}}</style></head><body>
<h1>Run summary</h1><p>{html.escape(str(out))}</p>
<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>reports</th></tr>{rows}</table>
<h2>Results</h2><table><tr><th>figure</th><th>value</th></tr>{figures}</table></body></html>"""
    path = out / "run" / "summary.html"
    with atomic_write(path) as handle:
        handle.write(page)
    return path


def _link(output_dir: Path, rel: str) -> str:
    if not (output_dir / rel).exists():
        return ""
    return f'<a href="../{html.escape(rel)}">{html.escape(rel)}</a>'
