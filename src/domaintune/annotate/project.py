"""An annotation project: a folder that holds the items, who labels what, every label, every decision.

project.json        task (schema, annotators, gate, arbitration), code lists, assignments, origin
items.jsonl         the items: {id, fields: {instruction, output, ...}, origin}
labels/<name>.jsonl one file per annotator (blind: an annotator's form and tasks never carry other labels);
                    appended, the latest entry per item counts
decisions.jsonl     arbitration: {item, field, value, by, at, note}, appended; every decision is kept
annotations.jsonl   `finalize`: one row per settled item, labels as fields (what `reader: annotations` reads)
report.{json,html}  agreement (per field, per label, overall, per pair), queue, gate, rounds
rounds.jsonl        the model's metric after each annotation round (active learning)
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domaintune.annotate.agreement import agreement_report, disputed_fields, normal_value
from domaintune.annotate.config import LabelSpec, TaskConfig, load_codes, task_from_dict
from domaintune.errors import UserError
from domaintune.utils.io import read_jsonl, write_json, write_jsonl


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def assign(item_ids: list[str], annotators: list[str], per_item: int, seed: int) -> dict[str, list[str]]:
    """Each item to `per_item` distinct annotators, dealt in turn from a shuffled order (balanced loads)."""
    order = list(annotators)
    random.Random(seed).shuffle(order)
    out = {}
    for k, item in enumerate(item_ids):
        out[item] = sorted(order[(k + j) % len(order)] for j in range(per_item))
    return out


def create_project(folder: Path, task: TaskConfig, items: list[dict[str, Any]], origin: dict[str, Any]) -> Project:
    folder = Path(folder)
    if (folder / "project.json").exists():
        raise UserError(f"{folder}: a project already exists here (choose another --out or delete it)")
    if not items:
        raise UserError("no items to label (the source is empty or every row was labelled before)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    codes = {s.name: load_codes(s.codes) for s in task.schema_ if s.kind == "term" and s.codes is not None}
    meta = {
        "name": task.name,
        "created_at": now(),
        "task": task.model_dump(mode="json", by_alias=True),
        "codes": codes,
        "origin": origin,
        "assignments": assign([it["id"] for it in items], task.annotators, task.per_item, task.sample.seed),
    }
    write_jsonl(folder / "items.jsonl", items)
    write_json(folder / "project.json", meta)
    return Project(folder)


@dataclass
class Project:
    folder: Path

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        path = self.folder / "project.json"
        if not path.is_file():
            raise UserError(f"{self.folder}: not an annotation project (no project.json)")
        self.meta = json.loads(path.read_text(encoding="utf-8"))
        self.task = task_from_dict(self.meta["task"], self.folder)
        self.codes: dict[str, dict[str, str]] = self.meta.get("codes", {})
        self.assignments: dict[str, list[str]] = self.meta["assignments"]
        self.items = {str(r["id"]): r for r in read_jsonl(self.folder / "items.jsonl")}

    @property
    def specs(self) -> list[LabelSpec]:
        return self.task.schema_

    def items_of(self, annotator: str) -> list[dict[str, Any]]:
        if annotator not in self.task.annotators:
            raise UserError(f"{annotator!r} is not an annotator of this project ({', '.join(self.task.annotators)})")
        return [self.items[i] for i, who in self.assignments.items() if annotator in who]

    # ---- labels ------------------------------------------------------------------------------------------
    def labels_file(self, annotator: str) -> Path:
        return self.folder / "labels" / f"{annotator}.jsonl"

    def check_labels(self, item_id: str, labels: dict[str, Any]) -> dict[str, Any]:
        """The labels of one item, validated against the schema; raises UserError naming the problem."""
        item = self.items.get(item_id)
        if item is None:
            raise UserError(f"item {item_id!r} is not in this project")
        unknown = set(labels) - {s.name for s in self.specs}
        if unknown:
            raise UserError(f"item {item_id}: unknown label field(s) {sorted(unknown)}")
        return {s.name: self._check_value(s, item, labels.get(s.name)) for s in self.specs if s.name in labels}

    def _check_value(self, spec: LabelSpec, item: dict, value: Any) -> Any:
        where = f"item {item['id']}: {spec.name}"
        if value is None or value == "" or value == []:
            return None
        if spec.kind == "single" and value not in spec.labels:
            raise UserError(f"{where}: {value!r} is not one of {spec.labels}")
        if spec.kind == "multi":
            value = [value] if isinstance(value, str) else list(value)
            bad = [v for v in value if v not in spec.labels]
            if bad:
                raise UserError(f"{where}: {bad} not in {spec.labels}")
            return sorted(set(value))
        if spec.kind == "term" and value not in self.codes.get(spec.name, {}):
            raise UserError(f"{where}: code {value!r} is not in the code list")
        if spec.kind == "spans":
            text = str(item["fields"].get(spec.field, ""))
            out = []
            for s in value:
                start, end, label = (s["start"], s["end"], s["label"]) if isinstance(s, dict) else s
                if label not in spec.labels or not 0 <= int(start) < int(end) <= len(text):
                    raise UserError(f"{where}: bad span {s!r} (text has {len(text)} characters)")
                out.append([int(start), int(end), label])
            return sorted(out)
        return str(value) if spec.kind == "text" else value

    def add_labels(self, annotator: str, entries: list[dict[str, Any]], via: str) -> int:
        """Append one annotator's labels ({item, labels}); items not assigned to them are refused (blindness and
        the double-labelling plan depend on it)."""
        mine = {it["id"] for it in self.items_of(annotator)}
        rows = []
        for e in entries:
            item_id = str(e["item"])
            if item_id not in mine:
                raise UserError(f"{annotator} labelled item {item_id!r}, which is not assigned to them")
            labels = self.check_labels(item_id, e.get("labels") or {})
            rows.append({"item": item_id, "annotator": annotator, "labels": labels, "at": now(), "via": via})
        with self.labels_file(annotator).open("a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        return len(rows)

    def labels(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{item: {annotator: labels}}, the latest entry of each annotator per item."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for annotator in self.task.annotators:
            path = self.labels_file(annotator)
            if path.is_file():
                for r in read_jsonl(path):
                    out.setdefault(r["item"], {})[annotator] = r["labels"]
        return out

    def labels_of(self, annotator: str) -> dict[str, dict[str, Any]]:
        """{item: labels} of one annotator only (their latest entry per item): what a blind screen may show them."""
        path = self.labels_file(annotator)
        if annotator not in self.task.annotators or not path.is_file():
            return {}
        return {r["item"]: r["labels"] for r in read_jsonl(path)}

    def complete(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Items every assigned annotator has labelled."""
        labels = self.labels()
        return {i: labels[i] for i, who in self.assignments.items() if i in labels and set(who) <= set(labels[i])}

    # ---- agreement and arbitration -----------------------------------------------------------------------
    def agreement(self) -> dict[str, Any]:
        pairs = [(self.items[i], by) for i, by in self.complete().items()]
        report = agreement_report(self.specs, pairs)
        report["gate"] = {
            "min_kappa": self.task.min_kappa,
            "passed": report["overall_kappa"] is not None and report["overall_kappa"] >= self.task.min_kappa,
        }
        return report

    def decisions(self) -> list[dict[str, Any]]:
        path = self.folder / "decisions.jsonl"
        return list(read_jsonl(path)) if path.is_file() else []

    def decide(self, by: str, entries: list[dict[str, Any]], note: str = "") -> int:
        """Record arbitration decisions ({item, field, value}); `by` must be one of the task's experts."""
        experts = self.task.arbitration.experts
        if experts and by not in experts:
            raise UserError(f"{by!r} is not an expert of this project ({', '.join(experts)})")
        rows = []
        for e in entries:
            item_id, field = str(e["item"]), e["field"]
            value = self.check_labels(item_id, {field: e["value"]})[field]
            rows.append({"item": item_id, "field": field, "value": value, "by": by, "at": now(), "note": note})
        with (self.folder / "decisions.jsonl").open("a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        return len(rows)

    def resolve(self) -> dict[str, dict[str, Any]]:
        """Per complete item: {labels, disputed, decided: {field: decision info}, pending: [fields]}."""
        by_item: dict[tuple[str, str], list[dict]] = {}
        for d in self.decisions():
            by_item.setdefault((d["item"], d["field"]), []).append(d)
        out = {}
        for item_id, by in self.complete().items():
            disputed = disputed_fields(self.specs, by)
            first = next(iter(by.values()))
            labels = {s.name: first.get(s.name) for s in self.specs if s.name not in disputed}
            decided, pending = {}, []
            for field in disputed:
                verdict = self._verdict(by_item.get((item_id, field), []))
                if verdict is None:
                    pending.append(field)
                else:
                    labels[field] = verdict["value"]
                    decided[field] = verdict
            out[item_id] = {"labels": labels, "disputed": disputed, "decided": decided, "pending": pending}
        return out

    def _verdict(self, decisions: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not decisions:
            return None
        arb = self.task.arbitration
        if arb.mode == "expert":
            last = decisions[-1]
            return {"value": last["value"], "by": [last["by"]], "mode": "expert", "at": last["at"]}
        latest = {d["by"]: d for d in decisions}  # each expert's last vote
        counts = Counter(json.dumps(d["value"], ensure_ascii=False, sort_keys=True) for d in latest.values())
        ranked = counts.most_common()
        top, votes = ranked[0]
        if votes < arb.min_votes or (len(ranked) > 1 and ranked[1][1] == votes):
            return None
        voters = sorted(
            b for b, d in latest.items() if json.dumps(d["value"], ensure_ascii=False, sort_keys=True) == top
        )
        return {"value": json.loads(top), "by": voters, "mode": "majority", "votes": dict(counts)}

    def queue(self) -> list[dict[str, Any]]:
        """Items waiting for arbitration, with every annotator's value of each disputed field."""
        labels = self.labels()
        out = []
        for item_id, res in self.resolve().items():
            if res["pending"]:
                values = {f: {a: labels[item_id][a].get(f) for a in sorted(labels[item_id])} for f in res["pending"]}
                out.append({"item": item_id, "fields": res["pending"], "values": values})
        return out

    # ---- the labelled set --------------------------------------------------------------------------------
    def finalize(self, force: bool = False) -> dict[str, Any]:
        """Write annotations.jsonl (settled items, labels as fields, the adjudicated answer as output)."""
        agreement = self.agreement()
        if not agreement["gate"]["passed"] and not force:
            raise UserError(
                f"agreement gate failed: overall kappa {agreement['overall_kappa']} < {self.task.min_kappa} "
                "(revise the guidelines and relabel, or finalize with --force)"
            )
        rows, pending = [], 0
        for item_id, res in self.resolve().items():
            if res["pending"]:
                pending += 1
                continue
            rows.append(self._row(item_id, res))
        write_jsonl(self.folder / "annotations.jsonl", rows)
        summary = {"rows": len(rows), "pending": pending, "unlabelled": len(self.items) - len(self.complete())}
        summary["gate_passed"] = agreement["gate"]["passed"]
        return summary

    def _row(self, item_id: str, res: dict[str, Any]) -> dict[str, Any]:
        item = self.items[item_id]
        row: dict[str, Any] = {"id": item_id}
        row.update({k: v for k, v in item["fields"].items() if k not in res["labels"]})
        out_field = self.task.output_field
        if out_field and res["labels"].get(out_field):
            row["original_output"] = item["fields"].get("output", "")
            row["output"] = res["labels"][out_field]
        for spec in self.specs:
            if spec.name != out_field:
                row[spec.name] = res["labels"].get(spec.name)
        row["annotation"] = {
            "project": self.task.name,
            "annotators": self.assignments[item_id],
            "disputed": res["disputed"],
            "decided": {f: {"by": d["by"], "mode": d["mode"]} for f, d in res["decided"].items()},
        }
        return row

    def status(self) -> dict[str, Any]:
        labels = self.labels()
        done = {a: sum(1 for i, by in labels.items() if a in by) for a in self.task.annotators}
        load = Counter(a for who in self.assignments.values() for a in who)
        resolved = self.resolve()
        return {
            "items": len(self.items),
            "complete": len(self.complete()),
            "progress": {a: {"done": done[a], "assigned": load[a]} for a in self.task.annotators},
            "disputed": sum(1 for r in resolved.values() if r["disputed"]),
            "arbitrated": sum(1 for r in resolved.values() if r["decided"] and not r["pending"]),
            "queue": sum(1 for r in resolved.values() if r["pending"]),
        }

    def value_equal(self, field: str, a: Any, b: Any) -> bool:
        spec = self.task.spec(field)
        return normal_value(spec, a) == normal_value(spec, b)
