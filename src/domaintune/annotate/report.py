"""The project report: agreement per field, per label and per annotator pair, the gate, the arbitration queue
and decisions, and the model's metric per annotation round (`report.json`, `report.html`)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from domaintune.annotate.project import Project, now
from domaintune.utils.io import read_jsonl, write_json


def rounds(project: Project) -> list[dict[str, Any]]:
    path = project.folder / "rounds.jsonl"
    return list(read_jsonl(path)) if path.is_file() else []


def add_round(project: Project, metrics: dict[str, float], labelled: int | None = None, note: str = "") -> dict:
    """Record the model's metrics after an annotation round (`labelled`: rows labelled so far)."""
    entry = {"round": len(rounds(project)) + 1, "at": now(), "labelled": labelled, "metrics": metrics, "note": note}
    with (project.folder / "rounds.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return entry


def metrics_of_run(run_dir: Path) -> dict[str, float]:
    """Tuned-model metrics of a run folder's eval report (numbers only)."""
    from domaintune.errors import UserError
    from domaintune.layout import RunLayout

    path = RunLayout(Path(run_dir)).eval_report
    if not path.is_file():
        raise UserError(f"{path} does not exist: run `domaintune eval` on that run first")
    report = json.loads(path.read_text(encoding="utf-8"))
    tuned = report.get("metrics", {}).get("test", {}).get("tuned", {})
    return {k: float(v) for k, v in tuned.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_report(project: Project) -> dict[str, Any]:
    report = {
        "project": project.task.name,
        "status": project.status(),
        "agreement": project.agreement(),
        "queue": project.queue(),
        "decisions": project.decisions(),
        "rounds": rounds(project),
    }
    write_json(project.folder / "report.json", report)
    (project.folder / "report.html").write_text(render_html(report), encoding="utf-8")
    return report


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(report: dict[str, Any]) -> str:
    ag = report["agreement"]
    fields = [[n, f["kind"], f.get("method"), f["kappa"], f["observed"], f["units"]] for n, f in ag["fields"].items()]
    per_label = [
        [n, cls, v["kappa"], v["observed"]]
        for n, f in ag["fields"].items()
        for cls, v in f.get("per_label", {}).items()
    ]
    pairs = [[p["a"], p["b"], p["kappa"], p["observed"], p["units"]] for p in ag["pairs"]]
    decisions = [
        [d["item"], d["field"], json.dumps(d["value"], ensure_ascii=False), d["by"], d["at"]]
        for d in report["decisions"]
    ]
    rounds_rows = [[r["round"], r["labelled"], json.dumps(r["metrics"]), r["note"]] for r in report["rounds"]]
    gate = ag["gate"]
    verdict = "passed" if gate["passed"] else "FAILED"
    parts = [
        f"<h1>Annotation project {_e(report['project'])}</h1>",
        f"<p>{_e(json.dumps(report['status'], ensure_ascii=False))}</p>",
        f"<h2>Agreement</h2><p>overall kappa <b>{_e(ag['overall_kappa'])}</b> on {ag['items']} items; "
        f"gate kappa ≥ {gate['min_kappa']}: <b>{verdict}</b></p>",
        _table(["field", "kind", "method", "kappa", "observed agreement", "units"], fields),
        "<h3>Per label (one vs rest)</h3>",
        _table(["field", "label", "kappa", "observed"], per_label),
        "<h3>Annotator pairs (Cohen)</h3>",
        _table(["a", "b", "kappa", "observed", "units"], pairs),
        f"<h2>Arbitration queue ({len(report['queue'])})</h2>",
        _table(["item", "fields"], [[q["item"], ", ".join(q["fields"])] for q in report["queue"]]),
        "<h2>Decisions</h2>",
        _table(["item", "field", "value", "by", "at"], decisions),
        "<h2>Rounds</h2>",
        _table(["round", "labelled", "metrics", "note"], rounds_rows),
    ]
    style = "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return f'<!doctype html><html><head><meta charset="utf-8"><style>{style}</style></head><body>{"".join(parts)}</body></html>\n'
