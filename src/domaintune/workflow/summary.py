"""The end-of-run summary: a rich table on the terminal and `run/summary.html` linking every report."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from domaintune.layout import RunLayout
from domaintune.utils.io import atomic_write
from domaintune.workflow.pipeline import RunResult

# RunLayout attributes of each stage's reports, linked from the summary page
STAGE_REPORTS = {
    "data": ["data_report_html", "data_report"],
    "train": ["loss_plot", "train_metrics"],
    "eval": ["eval_report_html", "eval_report"],
    "export": ["export_manifest"],
    "register": ["registered_file"],
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect_figures(output_dir: Path) -> list[tuple[str, str]]:
    """(label, value) pairs read from each stage's own report; absent reports are left out, not invented."""
    figures: list[tuple[str, str]] = []
    layout = RunLayout(output_dir)
    data = _load(layout.data_report)
    if data:
        totals = data["totals"]
        figures.append(("data rows in = kept + dropped", f"{totals['input']} = {totals['kept']} + {totals['dropped']}"))
        sizes = data["split"]["sizes"]
        figures.append(("split sizes (train/val/test)", " / ".join(str(sizes[s]) for s in ("train", "val", "test"))))
    train = _load(layout.train_metrics)
    if train:
        for key, label in (
            ("step0_val_loss", "val loss at step 0"),
            ("best_val_loss", "best val loss"),
            ("final_train_loss", "final train loss"),
            ("tokens_per_second", "training tokens/s"),
            ("wall_seconds", "training wall time (s)"),
        ):
            if train.get(key) is not None:
                value = train[key]
                figures.append((label, f"{value:.4g}" if isinstance(value, float) else str(value)))
    report = _load(layout.eval_report)
    if report:
        primary = report.get("primary_metric")
        for set_name, by_model in report.get("deltas", {}).items():
            for model, metrics in by_model.items():
                for metric, d in metrics.items():
                    if metric not in (primary, "bleu", "perplexity"):
                        continue
                    figures.append(
                        (
                            f"{set_name}: {metric} {model} vs base",
                            f"{d['base']:.4g} -> {d['model']:.4g} (delta {d['delta']:+.3g}, "
                            f"95% CI [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}])",
                        )
                    )
        for set_name, section in report.get("sets", {}).items():
            for model, c in section.get("concentration", {}).items():
                if c.get("flagged"):
                    figures.append(
                        (f"{set_name}: {model} gain concentrated (template-learning alarm)", "; ".join(c["reasons"]))
                    )
        for model, retention in report.get("retention", {}).items():
            if retention.get("ratio") is not None:
                figures.append((f"retention ({model} / base on the general set)", f"{retention['ratio']:.3f}"))
        gates = report.get("gates", {})
        if gates:
            figures.append(
                ("eval gates", "passed" if gates.get("passed") else "FAILED: " + "; ".join(gates.get("failures", [])))
            )
    registered = _load(layout.registered_file)
    if registered:
        figures.append(("registered version", f"{registered['version']} ({registered['status']})"))
    for path in (layout.train_file, layout.model_dir, layout.eval_report_html, layout.export_dir):
        if path.exists():
            figures.append((f"path: {layout.relative(path)}", str(path)))
    return figures


def print_summary(result: RunResult, console: Console) -> None:
    stages = Table("stage", "status", "seconds", title=f"run {result.output_dir}")
    for outcome in result.outcomes:
        stages.add_row(
            outcome.name, outcome.status + (f" ({outcome.reason})" if outcome.reason else ""), f"{outcome.seconds:.1f}"
        )
    console.print(stages)
    figures = Table("figure", "value", title="results")
    for label, value in collect_figures(result.output_dir):
        figures.add_row(label, value)
    console.print(figures)


def write_summary_html(result: RunResult) -> Path:
    out = result.output_dir
    rows = "".join(
        f"<tr><td>{html.escape(o.name)}</td><td>{html.escape(o.status)}</td><td>{o.seconds:.1f}</td>"
        f"<td>{' '.join(_link(RunLayout(out), attr) for attr in STAGE_REPORTS[o.name])}</td></tr>"
        for o in result.outcomes
    )
    figures = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in collect_figures(out))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>domaintune run summary</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:left}}th{{background:#f3f3f3}}</style></head><body>
<h1>Run summary</h1><p>{html.escape(str(out))}</p>
<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>reports</th></tr>{rows}</table>
<h2>Results</h2><table><tr><th>figure</th><th>value</th></tr>{figures}</table></body></html>"""
    path = RunLayout(out).summary_html
    with atomic_write(path) as handle:
        handle.write(page)
    return path


def _link(layout: RunLayout, attr: str) -> str:
    path = getattr(layout, attr)
    if not path.exists():
        return ""
    rel = layout.relative(path)
    return f'<a href="../{html.escape(rel)}">{html.escape(rel)}</a>'
