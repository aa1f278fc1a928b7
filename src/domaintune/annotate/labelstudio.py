"""Label Studio round trip: tasks in its import format with a matching labelling config, and its JSON export
read back as labels.

Blindness: each annotator gets their own task file (import it into a project only they see, or use Label Studio
Enterprise's overlap settings); tasks carry no labels. The export is read per annotator: `completed_by` (a user
id, or a user object with an email in older versions) is mapped to an annotator name with `users`, or every
annotation of the file is credited to `annotator`.

Tags used: `<Text>` per shown field; `<Choices choice="single|multiple">` for single/multi labels; `<Labels>`
on a text for spans; `<TextArea>` for a corrected text; `<Choices>` with `alias` = the code for term mapping.
Results read back: `choices` → value.choices, `labels` → value.start/end/labels, `textarea` → value.text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from domaintune.annotate.project import Project
from domaintune.errors import UserError


def _text_fields(project: Project) -> list[str]:
    fields = list(project.task.show)
    for spec in project.specs:
        if spec.kind in ("spans", "text") and spec.field not in fields:
            fields.append(spec.field)
    return fields


def labeling_config(project: Project) -> str:
    """The `<View>` XML matching the task's schema."""
    fields = _text_fields(project)
    parts = ["<View>"]
    if project.task.instructions:
        parts.append(f"  <Header value={quoteattr(project.task.instructions)}/>")
    for f in fields:
        parts.append(f"  <Header value={quoteattr(f)}/>")
        parts.append(f"  <Text name={quoteattr(f)} value={quoteattr('$' + f)}/>")
    for spec in project.specs:
        parts.extend("  " + line for line in _control(project, spec, fields[0]))
    parts.append("</View>")
    return "\n".join(parts) + "\n"


def _control(project: Project, spec, first: str) -> list[str]:
    name = quoteattr(spec.name)
    required = ' required="true"' if spec.required and spec.kind in ("single", "term") else ""
    if spec.kind in ("single", "multi"):
        mode = "single" if spec.kind == "single" else "multiple"
        head = f'<Choices name={name} toName={quoteattr(first)} choice="{mode}" showInline="true"{required}>'
        return [head, *(f"  <Choice value={quoteattr(v)}/>" for v in spec.labels), "</Choices>"]
    if spec.kind == "spans":
        head = f"<Labels name={name} toName={quoteattr(spec.field)}>"
        return [head, *(f"  <Label value={quoteattr(v)}/>" for v in spec.labels), "</Labels>"]
    if spec.kind == "text":
        return [
            f"<Header value={quoteattr(f'{spec.name}: corrected {spec.field} (leave empty if it is right)')}/>",
            f'<TextArea name={name} toName={quoteattr(spec.field)} editable="true" maxSubmissions="1" rows="4"/>',
        ]
    codes = project.codes.get(spec.name, {})
    head = f'<Choices name={name} toName={quoteattr(first)} choice="single"{required}>'
    options = (f"  <Choice value={quoteattr(f'{c} {n}'.strip())} alias={quoteattr(c)}/>" for c, n in codes.items())
    return [head, *options, "</Choices>"]


def export_tasks(project: Project, annotator: str) -> list[dict[str, Any]]:
    """The annotator's items as Label Studio tasks (`data` only: no one else's labels)."""
    fields = _text_fields(project)
    tasks = []
    for item in project.items_of(annotator):
        data = {"item_id": item["id"], "project": project.task.name}
        data.update({f: str(item["fields"].get(f, "")) for f in fields})
        tasks.append({"data": data})
    return tasks


def write_labelstudio(project: Project, out_dir: Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.xml").write_text(labeling_config(project), encoding="utf-8")
    files = {}
    for annotator in project.task.annotators:
        path = out_dir / f"tasks-{annotator}.json"
        path.write_text(json.dumps(export_tasks(project, annotator), ensure_ascii=False, indent=1), encoding="utf-8")
        files[annotator] = str(path)
    return {"config": str(out_dir / "config.xml"), "tasks": files}


# ---- reading an export back ------------------------------------------------------------------------------
def _who(annotation: dict[str, Any], annotator: str | None, users: dict[str, str]) -> str:
    if annotator:
        return annotator
    raw = annotation.get("completed_by")
    keys = [str(raw)] if not isinstance(raw, dict) else [str(raw.get("id")), str(raw.get("email"))]
    for k in keys:
        if k in users:
            return users[k]
    raise UserError(f"Label Studio user {raw!r} is not mapped to an annotator (pass --annotator or --users)")


def result_labels(project: Project, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One annotation's `result` list as {label field: value}."""
    labels: dict[str, Any] = {}
    for r in results:
        spec = next((s for s in project.specs if s.name == r.get("from_name")), None)
        if spec is None:
            continue
        value = r.get("value", {})
        if spec.kind in ("single", "term"):
            choices = value.get("choices") or []
            if choices:
                chosen = str(choices[0])
                labels[spec.name] = chosen.split(" ", 1)[0] if spec.kind == "term" else chosen
        elif spec.kind == "multi":
            labels[spec.name] = list(value.get("choices") or [])
        elif spec.kind == "spans":
            for lab in value.get("labels") or []:
                labels.setdefault(spec.name, []).append([int(value["start"]), int(value["end"]), lab])
        elif spec.kind == "text":
            text = value.get("text") or []
            labels[spec.name] = "\n".join(text) if isinstance(text, list) else str(text)
    return labels


def read_export(
    project: Project, path: Path, annotator: str | None = None, users: dict[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """A Label Studio JSON export → {annotator: [{item, labels}]} (cancelled/skipped annotations ignored)."""
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a Label Studio JSON export ({exc})") from None
    if not isinstance(tasks, list):
        raise UserError(f"{path}: a Label Studio JSON export is a list of tasks")
    out: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        item = (task.get("data") or {}).get("item_id")
        if item is None:
            raise UserError(f"{path}: task {task.get('id')} has no data.item_id (was it exported by domaintune?)")
        for ann in task.get("annotations") or []:
            if ann.get("was_cancelled"):
                continue
            who = _who(ann, annotator, users or {})
            out.setdefault(who, []).append({"item": str(item), "labels": result_labels(project, ann["result"])})
    return out


def import_export(
    project: Project, path: Path, annotator: str | None = None, users: dict[str, str] | None = None
) -> dict[str, int]:
    return {
        who: project.add_labels(who, entries, via="labelstudio")
        for who, entries in read_export(project, path, annotator, users).items()
    }
