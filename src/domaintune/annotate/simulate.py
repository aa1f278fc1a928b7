"""A scripted annotation round (for tests, demos and the figures in docs/annotation.md): annotators who label
an intent field from a known truth with a controlled error rate, an expert who arbitrates from the truth, then
the settled set as a data source of a project trained with `domaintune run`.

    python -m domaintune.annotate.simulate --csv ../shared/datasets/zh_medical_dialogue/internal_medicine_sample.csv
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from domaintune.annotate.config import task_from_dict
from domaintune.annotate.items import candidate_rows, sample_rows
from domaintune.annotate.project import Project, create_project


def scripted_annotator(project: Project, who: str, truth: str, error_rate: float, seed: int) -> int:
    """Label every item assigned to `who` with its `truth` field, wrong (another class) with `error_rate`."""
    spec = next(s for s in project.specs if s.kind == "single")
    rng = random.Random(f"{seed}:{who}")
    entries = []
    for item in project.items_of(who):
        value = str(item["fields"][truth])
        if rng.random() < error_rate:
            value = rng.choice([c for c in spec.labels if c != value])
        entries.append({"item": item["id"], "labels": {spec.name: value}})
    return project.add_labels(who, entries, via="script")


def oracle_expert(project: Project, expert: str, truth: str) -> int:
    """Decide every queued item from its `truth` field (an expert who is always right)."""
    decisions = [
        {"item": q["item"], "field": f, "value": project.items[q["item"]]["fields"][truth]}
        for q in project.queue()
        for f in q["fields"]
    ]
    return project.decide(expert, decisions, note="scripted expert") if decisions else 0


def project_yaml(csv: Path, folder: Path) -> Path:
    text = (
        "name: zh-departments\nmodel: {name_or_path: tiny-random-llama}\ndata:\n  sources:\n"
        f"    - {{name: zh, path: {json.dumps(str(csv))}, reader: csv, fields: {{instruction: [title, ask], output: answer}},"
        " keep: [department]}\n"
    )
    path = folder / "source.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def simulate(csv: Path, folder: Path, n: int, errors: dict[str, float], seed: int = 0) -> dict[str, Any]:
    """Create, label (scripted, blind), measure, arbitrate, finalize. Returns the figures."""
    from domaintune.config import load_config

    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(project_yaml(csv, folder))
    task_data = {
        "name": "departments",
        "sample": {"source": "zh", "n": n, "seed": seed},
        "schema": [{"name": "intent", "kind": "single", "labels": _departments(cfg)}],
        "annotators": list(errors),
        "arbitration": {"mode": "expert", "experts": ["expert"]},
        "min_kappa": 0.85,
    }
    task = task_from_dict(task_data, folder)
    rows = sample_rows(candidate_rows(cfg, task.sample), n, seed)
    project = create_project(folder / "project", task, rows, {"simulated": True, "errors": errors})
    for who, rate in errors.items():
        scripted_annotator(project, who, "department", rate, seed)
    agreement = project.agreement()
    queued = len(project.queue())
    oracle_expert(project, "expert", "department")
    summary = project.finalize()
    wrong_after = sum(
        1
        for line in (project.folder / "annotations.jsonl").open(encoding="utf-8")
        if (r := json.loads(line))["intent"] != r["department"]
    )
    return {
        "items": len(project.items),
        "kappa": agreement["overall_kappa"],
        "method": agreement["fields"]["intent"]["method"],
        "observed": agreement["fields"]["intent"]["observed"],
        "gate_passed": agreement["gate"]["passed"],
        "arbitrated": queued,
        "rows": summary["rows"],
        "wrong_labels_after_arbitration": wrong_after,
        "project": str(project.folder),
    }


def active_rounds(
    folder: Path, rounds: int, per_round: int, errors: dict[str, float], method: str = "margin", seed: int = 0
) -> list[dict[str, Any]]:
    """After the first (random) round in `folder/project`, `rounds` more rounds chosen by `method` (margin, or
    random for the baseline), each labelled by the scripted annotators and arbitrated, each recorded with the
    intent classifier's accuracy on 500 held-out rows (the project report's rounds table)."""
    from domaintune.annotate.active import BigramNB, margin_uncertainty, rank_rows, settled_labels
    from domaintune.annotate.report import add_round
    from domaintune.config import load_config

    cfg = load_config(folder / "source.yaml")
    first = Project(folder / "project")
    done = [first.folder]
    pool = candidate_rows(cfg, first.task.sample.model_copy(update={"exclude": done}))
    holdout, pool = pool[:500], pool[500:]
    texts = [str(r["fields"]["instruction"]) for r in holdout]
    truth = [str(r["fields"]["department"]) for r in holdout]
    history = []
    for k in range(rounds + 1):
        model = BigramNB().fit(*settled_labels(done, "intent"))
        acc = sum(model.predict(t) == y for t, y in zip(texts, truth)) / len(truth)
        labelled = sum(1 for p in done for _ in (p / "annotations.jsonl").open(encoding="utf-8"))
        history.append(add_round(Project(done[-1]), {"intent_accuracy": round(acc, 4)}, labelled, method))
        if k == rounds:
            break
        taken = {i for p in done for i in Project(p).items}
        left = [r for r in pool if r["id"] not in taken]
        prompts = [str(r["fields"]["instruction"]) for r in left]
        if method == "random":
            chosen = sample_rows(left, per_round, seed + k)
        else:
            order = rank_rows(left, margin_uncertainty(model, prompts))
            by_id = {r["id"]: r for r in left}
            chosen = [by_id[r["id"]] for r in order[:per_round]]
        task = first.task.model_copy(update={"name": f"departments-{method}-r{k + 2}"})
        project = create_project(folder / f"{method}-r{k + 2}", task, chosen, {"selected_by": method})
        for who, rate in errors.items():
            scripted_annotator(project, who, "department", rate, seed + k)
        oracle_expert(project, "expert", "department")
        project.finalize(force=True)
        done.append(project.folder)
    return history


def _departments(cfg) -> list[str]:
    from domaintune.annotate.items import source_rows

    return sorted({str(r["fields"]["department"]) for r in source_rows(cfg, "zh")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/annotate-sim"))
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--errors", default="ann_a=0.02,ann_b=0.04")
    ap.add_argument("--rounds", type=int, default=0, help="Active-learning rounds after the first (margin vs random).")
    args = ap.parse_args()
    errors = {k: float(v) for k, v in (p.split("=") for p in args.errors.split(","))}
    print(json.dumps(simulate(args.csv.resolve(), args.out.resolve(), args.n, errors), ensure_ascii=False, indent=1))
    for method in ("margin", "random") if args.rounds else ():
        hist = active_rounds(args.out.resolve(), args.rounds, args.n, errors, method)
        print(method, [(h["labelled"], h["metrics"]["intent_accuracy"]) for h in hist])


if __name__ == "__main__":
    main()
