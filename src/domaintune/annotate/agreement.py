"""Agreement between annotators: Cohen's kappa (two fixed raters), Fleiss' kappa (more, or rotating raters),
per label field, per class (one-vs-rest) and overall, plus which items disagree.

Units: a `single`/`term` label is one categorical decision per item; a `multi` label is one yes/no decision per
class per item; `spans` are tagged character by character (each character of the field gets its entity type or
`O`), the usual way of scoring NER agreement. `text` corrections have no kappa; their exact-agreement rate is
reported. Overall kappa is the unweighted mean of the field kappas (every categorical question counts alike).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from typing import Any

from domaintune.annotate.config import LabelSpec
from domaintune.eval.stats import cohen_kappa

NONE = "<none>"
Unit = tuple[tuple[str, ...], tuple[str, ...]]  # (raters, their values), raters sorted


def fleiss_kappa(units: Sequence[Sequence[str]]) -> float | None:
    """Fleiss' kappa over items each rated by the same number n >= 2 of raters; None when undefined."""
    units = [list(u) for u in units]
    if not units:
        return None
    n = len(units[0])
    if n < 2 or any(len(u) != n for u in units):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings on every item")
    cats = sorted({v for u in units for v in u})
    total = len(units) * n
    p_j = {c: sum(u.count(c) for u in units) / total for c in cats}
    p_i = [(sum(u.count(c) ** 2 for c in set(u)) - n) / (n * (n - 1)) for u in units]
    p_bar = sum(p_i) / len(units)
    p_e = sum(p * p for p in p_j.values())
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def kappa(units: Sequence[Unit]) -> dict[str, Any]:
    """Cohen's kappa when every unit has the same two raters, else Fleiss' kappa; with observed agreement."""
    units = [u for u in units if len(u[1]) >= 2]
    if not units:
        return {"kappa": None, "method": None, "units": 0, "observed": None}
    sizes = {len(v) for _, v in units}
    if len(sizes) > 1:  # items with an unfinished rater are left out so every item has the same n
        n = max(sizes)
        units = [u for u in units if len(u[1]) == n]
    observed = sum(len(set(v)) == 1 for _, v in units) / len(units)
    pairs = {r for r, _ in units}
    if len(units[0][1]) == 2 and len(pairs) == 1:
        value = cohen_kappa([v[0] for _, v in units], [v[1] for _, v in units])
        method = "cohen"
    else:
        value = fleiss_kappa([v for _, v in units])
        method = "fleiss"
    return {"kappa": _round(value), "method": method, "units": len(units), "observed": round(observed, 4)}


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


# ---- from labels to units --------------------------------------------------------------------------------
def normal_value(spec: LabelSpec, value: Any) -> Any:
    """A comparable form of a label value (lists sorted, text whitespace-collapsed)."""
    if value is None or value == "" or value == []:
        return None
    if spec.kind == "multi":
        return tuple(sorted(value))
    if spec.kind == "spans":
        return tuple(sorted((int(s[0]), int(s[1]), str(s[2])) for s in value))
    if spec.kind == "text":
        return re.sub(r"\s+", " ", str(value)).strip()
    return str(value)


def _char_tags(spans: Any, length: int) -> list[str]:
    tags = ["O"] * length
    for start, end, label in spans or ():
        for k in range(max(0, start), min(length, end)):
            if tags[k] == "O":
                tags[k] = label
    return tags


def field_units(spec: LabelSpec, item_labels: list[tuple[dict[str, Any], dict[str, dict]]]) -> dict[str, list[Unit]]:
    """Units of one label field: {'': units of the field, class: one-vs-rest units of that class}.

    `item_labels`: per item (item, {annotator: labels})."""
    out: dict[str, list[Unit]] = {"": []}
    for cls in spec.labels:
        out[cls] = []
    for item, by in item_labels:
        raters = tuple(sorted(by))
        values = [normal_value(spec, by[r].get(spec.name)) for r in raters]
        if spec.kind in ("single", "term"):
            cat = tuple(v if v is not None else NONE for v in values)
            out[""].append((raters, cat))
            for cls in spec.labels:
                out[cls].append((raters, tuple(str(v == cls) for v in values)))
        elif spec.kind == "multi":
            for cls in spec.labels:
                unit = (raters, tuple(str(cls in (v or ())) for v in values))
                out[cls].append(unit)
                out[""].append(unit)
        elif spec.kind == "spans":
            text = str(item["fields"].get(spec.field, ""))
            tags = [_char_tags(v, len(text)) for v in values]
            for k in range(len(text)):
                out[""].append((raters, tuple(t[k] for t in tags)))
                for cls in spec.labels:
                    out[cls].append((raters, tuple(str(t[k] == cls) for t in tags)))
    return out


def agreement_report(specs: list[LabelSpec], item_labels: list[tuple[dict, dict[str, dict]]]) -> dict[str, Any]:
    """Per field: kappa (Cohen/Fleiss), observed agreement, per-class kappa; text fields: exact agreement;
    overall: mean of the field kappas; pairwise Cohen's kappa per annotator pair on the categorical fields."""
    complete = [(item, by) for item, by in item_labels if len(by) >= 2]
    fields: dict[str, Any] = {}
    for spec in specs:
        if spec.kind == "text":
            same = [len({normal_value(spec, lab.get(spec.name)) for lab in by.values()}) == 1 for _, by in complete]
            fields[spec.name] = {"kind": "text", "kappa": None, "observed": _share(same), "units": len(same)}
            continue
        units = field_units(spec, complete)
        entry = {"kind": spec.kind, **kappa(units[""])}
        entry["per_label"] = {cls: kappa(u) for cls, u in units.items() if cls}
        fields[spec.name] = entry
    values = [f["kappa"] for f in fields.values() if f["kappa"] is not None]
    overall = round(sum(values) / len(values), 4) if values else None
    return {
        "items": len(complete),
        "fields": fields,
        "overall_kappa": overall,
        "pairs": pairwise(specs, complete),
    }


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def pairwise(specs: list[LabelSpec], complete: list[tuple[dict, dict[str, dict]]]) -> list[dict[str, Any]]:
    """Cohen's kappa of every annotator pair on the items both labelled (single/term fields pooled)."""
    cats = [s for s in specs if s.kind in ("single", "term")]
    shared: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for _, by in complete:
        for a, b in combinations(sorted(by), 2):
            for spec in cats:
                va = normal_value(spec, by[a].get(spec.name)) or NONE
                vb = normal_value(spec, by[b].get(spec.name)) or NONE
                shared.setdefault((a, b), []).append((f"{spec.name}={va}", f"{spec.name}={vb}"))
    out = []
    for (a, b), pairs in sorted(shared.items()):
        value = cohen_kappa([p[0] for p in pairs], [p[1] for p in pairs])
        agree = sum(p[0] == p[1] for p in pairs) / len(pairs)
        out.append({"a": a, "b": b, "units": len(pairs), "kappa": _round(value), "observed": round(agree, 4)})
    return out


def disputed_fields(specs: list[LabelSpec], by: dict[str, dict]) -> list[str]:
    """Label fields on which the annotators of one item gave different values."""
    out = []
    for spec in specs:
        values = Counter(repr(normal_value(spec, lab.get(spec.name))) for lab in by.values())
        if len(values) > 1:
            out.append(spec.name)
    return out
