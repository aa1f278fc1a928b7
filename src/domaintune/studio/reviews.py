"""Blind expert review in the browser, on top of `eval.review`'s export and import.

An engineer starts a review: `export_review` writes review.csv / review_key.json into
`<run>/eval/review/studio-<time>/`. Reviewers see only the blinded A/B items (the key never leaves
the server) and their choices are saved as `review-<reviewer>.csv` in the very format
`domaintune eval import-review` reads, so the studio's results are `import_review`'s results.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.eval.review import CHOICES, export_review, import_review
from domaintune.layout import RunLayout
from domaintune.utils.io import atomic_write

_SAFE = re.compile(r"[^\w.-]+")


def reviews(layout: RunLayout) -> list[dict[str, Any]]:
    found = []
    if layout.review_dir.is_dir():
        for folder in sorted(layout.review_dir.glob("studio-*"), reverse=True):
            key_file = folder / "review_key.json"
            if key_file.is_file():
                key = json.loads(key_file.read_text(encoding="utf-8"))
                found.append(
                    {
                        "folder": folder.name,
                        "review_id": key["review_id"],
                        "models": key["models"],
                        "n_items": len(key["items"]),
                        "reviewers": sorted(_reviewer_of(p) for p in folder.glob("review-*.csv")),
                    }
                )
    return found


def _reviewer_of(path: Path) -> str:
    rows = _read_rows(path)
    return rows[0]["reviewer"] if rows else path.stem.removeprefix("review-")


def _folder(layout: RunLayout, folder: str) -> Path:
    path = layout.review_dir / Path(folder).name
    if not folder.startswith("studio-") or not (path / "review_key.json").is_file():
        raise UserError(f"review {folder!r} not found")
    return path


def start_review(layout: RunLayout, n_items: int, model_a: str, model_b: str, seed: int, show_reference: bool) -> str:
    name = "studio-" + time.strftime("%Y%m%d-%H%M%S")
    export_review(layout, n_items, model_a, model_b, seed, show_reference, out_dir=layout.review_dir / name)
    return name


def blinded_items(layout: RunLayout, folder: str) -> list[dict[str, str]]:
    """The review's items as a reviewer sees them: question, (reference), answer A, answer B; no key."""
    with open(_folder(layout, folder) / "review.csv", encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _reviewer_file(layout: RunLayout, folder: str, reviewer: str) -> Path:
    return _folder(layout, folder) / f"review-{_SAFE.sub('_', reviewer)}.csv"


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def my_choices(layout: RunLayout, folder: str, reviewer: str) -> dict[str, dict[str, str]]:
    return {r["item_id"]: r for r in _read_rows(_reviewer_file(layout, folder, reviewer))}


def save_choices(layout: RunLayout, folder: str, reviewer: str, choices: dict[str, tuple[str, str]]) -> int:
    """Write the reviewer's file (item -> (choice, comment)); returns how many items are answered."""
    items = blinded_items(layout, folder)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["review_id", "item_id", "reviewer", "choice", "comment"])
    answered = 0
    for item in items:
        choice, comment = choices.get(item["item_id"], ("", ""))
        if choice and choice not in CHOICES:
            raise UserError(f"choice {choice!r} must be one of {', '.join(CHOICES)}")
        answered += bool(choice)
        writer.writerow([item["review_id"], item["item_id"], reviewer, choice, comment])
    with atomic_write(_reviewer_file(layout, folder, reviewer), encoding="utf-8-sig") as handle:
        handle.write(buffer.getvalue())
    return answered


def results(layout: RunLayout, folder: str) -> dict[str, Any]:
    """`import_review` over every reviewer's file, plus the items the reviewers disagree on (unblinded)."""
    path = _folder(layout, folder)
    files = sorted(path.glob("review-*.csv"))
    if not files:
        raise UserError("no reviewer has answered yet")
    result = import_review(files, path / "review_key.json")
    key = json.loads((path / "review_key.json").read_text(encoding="utf-8"))
    items = {i["item_id"]: i for i in blinded_items(layout, folder)}
    verdicts: dict[str, dict[str, tuple[str, str]]] = {}
    for f in files:
        for row in _read_rows(f):
            if row["choice"]:
                side = key["items"][row["item_id"]]
                winner = "tie" if row["choice"] == "tie" else side[row["choice"]]
                verdicts.setdefault(row["item_id"], {})[row["reviewer"]] = (winner, row.get("comment", ""))
    result["disagreements"] = [
        {"item_id": item_id, "question": items[item_id]["question"], "verdicts": per, "key": key["items"][item_id]}
        for item_id, per in sorted(verdicts.items())
        if len({w for w, _ in per.values()}) > 1
    ]
    return result
