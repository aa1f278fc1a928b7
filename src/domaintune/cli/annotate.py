"""`domaintune annotate ...`: labelling projects (blind double labelling, agreement, arbitration, Label Studio),
active-learning selection and annotation rounds. See docs/annotation.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load

ProjectArg = Annotated[Path, typer.Argument(help="Annotation project folder.", show_default=False)]
TaskOpt = Annotated[Path, typer.Option("--task", help="Annotation task YAML (schema, annotators, gate).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Project folder (default: <run>/annotate/<task name>).")]

out = Console(soft_wrap=True, highlight=False)


def _say(text: str) -> None:
    out.print(text, markup=False)


def _agreement_lines(report: dict) -> None:
    ag = report["agreement"]
    gate = ag["gate"]
    verdict = "passed" if gate["passed"] else "FAILED"
    _say(f"overall kappa {ag['overall_kappa']} on {ag['items']} items; gate >= {gate['min_kappa']}: {verdict}")
    for name, f in ag["fields"].items():
        _say(f"  {name} ({f['kind']}): kappa {f['kappa']} [{f.get('method')}], observed {f['observed']}")
    st = report["status"]
    _say(f"items {st['items']}, fully labelled {st['complete']}, disputed {st['disputed']}, queue {st['queue']}")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Annotation projects: label training data with agreement and arbitration.")
    app.add_typer(sub, name="annotate")
    _register_project_commands(sub)
    _register_label_commands(sub)
    _register_active_commands(sub)


def _register_project_commands(sub: typer.Typer) -> None:
    @sub.command("create")
    @friendly_errors
    def create(
        config: ConfigArg, task: TaskOpt, out_dir: OutOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None
    ) -> None:
        """Sample rows of a source or split into a labelling project; each item goes to two blind annotators."""
        from domaintune.annotate.config import load_task
        from domaintune.annotate.items import candidate_rows, sample_rows
        from domaintune.annotate.project import create_project

        cfg = load(config, set_, output_dir)
        t = load_task(task)
        rows = sample_rows(candidate_rows(cfg, t.sample), t.sample.n, t.sample.seed)
        folder = out_dir or cfg.layout.root / "annotate" / t.name
        project = create_project(folder, t, rows, {"config": str(config), **t.sample.model_dump(mode="json")})
        _say(f"project {t.name}: {len(project.items)} items, {t.per_item} annotators each, in {folder}")

    @sub.command("status")
    @friendly_errors
    def status(project: ProjectArg) -> None:
        """Agreement (per field, per label, overall), the gate and the arbitration queue; writes report.{json,html}."""
        from domaintune.annotate.project import Project
        from domaintune.annotate.report import build_report

        report = build_report(Project(project))
        _agreement_lines(report)
        _say(f"report: {project / 'report.html'}")

    @sub.command("finalize")
    @friendly_errors
    def finalize(
        project: ProjectArg, force: Annotated[bool, typer.Option(help="Write even if the gate failed.")] = False
    ) -> None:
        """Write annotations.jsonl (settled items) for `reader: annotations`."""
        from domaintune.annotate.project import Project
        from domaintune.annotate.report import build_report

        p = Project(project)
        summary = p.finalize(force=force)
        build_report(p)
        _say(
            f"{summary['rows']} rows -> {project / 'annotations.jsonl'}; waiting for arbitration {summary['pending']}, unlabelled {summary['unlabelled']}"
        )


def _register_label_commands(sub: typer.Typer) -> None:
    @sub.command("export")
    @friendly_errors
    def export(
        project: ProjectArg,
        fmt: Annotated[str, typer.Option("--format", help="html (self-contained forms) or labelstudio.")] = "html",
        out_dir: Annotated[Path | None, typer.Option("--out", help="Folder (default: <project>/<format>).")] = None,
    ) -> None:
        """Labelling forms per annotator (+ arbitration forms per expert), or Label Studio tasks + config."""
        from domaintune.annotate.forms import write_forms
        from domaintune.annotate.labelstudio import write_labelstudio
        from domaintune.annotate.project import Project
        from domaintune.errors import UserError

        p = Project(project)
        if fmt == "html":
            files = write_forms(p, out_dir or project / "forms")
        elif fmt == "labelstudio":
            files = write_labelstudio(p, out_dir or project / "labelstudio")
        else:
            raise UserError(f"--format {fmt!r}: html or labelstudio")
        _say(json.dumps(files, ensure_ascii=False, indent=1))

    @sub.command("import")
    @friendly_errors
    def import_(
        project: ProjectArg,
        files: Annotated[list[Path], typer.Argument(help="Form downloads or Label Studio JSON exports.")],
        annotator: Annotated[
            str | None, typer.Option(help="Credit every annotation in the files to this annotator.")
        ] = None,
        users: Annotated[Path | None, typer.Option(help="Label Studio: JSON {user id or email: annotator}.")] = None,
    ) -> None:
        """Read labels back (a form download, or a Label Studio JSON export)."""
        from domaintune.annotate.forms import read_form_file
        from domaintune.annotate.labelstudio import import_export
        from domaintune.annotate.project import Project

        p = Project(project)
        user_map = json.loads(users.read_text(encoding="utf-8")) if users else None
        for f in files:
            head = f.read_text(encoding="utf-8").lstrip()[:1]
            if head == "[":
                counts = import_export(p, f, annotator, user_map)
            else:
                doc = read_form_file(f)
                who = annotator or doc["annotator"]
                counts = {who: p.add_labels(who, doc["labels"], via="form")}
            _say(f"{f}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    @sub.command("decide")
    @friendly_errors
    def decide(
        project: ProjectArg,
        files: Annotated[list[Path] | None, typer.Argument(help="Arbitration form downloads.")] = None,
        by: Annotated[str | None, typer.Option(help="Expert deciding (default: the form's expert).")] = None,
        item: Annotated[str | None, typer.Option(help="One decision: item id.")] = None,
        field: Annotated[str | None, typer.Option(help="One decision: label field.")] = None,
        value: Annotated[str | None, typer.Option(help="One decision: value (JSON for lists).")] = None,
        note: Annotated[str, typer.Option(help="Why (kept with the decision).")] = "",
    ) -> None:
        """Arbitrate disputed items: every decision is kept with who made it."""
        from domaintune.annotate.forms import read_form_file
        from domaintune.annotate.project import Project
        from domaintune.errors import UserError

        p = Project(project)
        n = 0
        for f in files or []:
            doc = read_form_file(f)
            n += p.decide(by or doc["expert"], doc["decisions"], note)
        if item is not None:
            if by is None or field is None or value is None:
                raise UserError("a single decision needs --by, --item, --field and --value")
            parsed = json.loads(value) if value[:1] in "[{" else value
            n += p.decide(by, [{"item": item, "field": field, "value": parsed}], note)
        _say(f"{n} decisions recorded; queue now {len(p.queue())}")


def _register_active_commands(sub: typer.Typer) -> None:
    @sub.command("select")
    @friendly_errors
    def select(
        config: ConfigArg,
        task: TaskOpt,
        out_dir: OutOpt = None,
        method: Annotated[str, typer.Option(help="margin (intent classifier), perplexity, or sampling.")] = "margin",
        n: Annotated[int, typer.Option(help="Items in the new round.")] = 50,
        labelled: Annotated[
            list[Path] | None, typer.Option("--labelled", help="Finished projects (training labels, excluded rows).")
        ] = None,
        set_: SetOpt = None,
        output_dir: OutputDirOpt = None,
    ) -> None:
        """Rank unlabelled rows by the current model's uncertainty (with MinHash diversity) into the next round."""
        from domaintune.annotate.active import select_round

        cfg = load(config, set_, output_dir)
        result = select_round(cfg, task, method, n, labelled or [], out_dir)
        _say(f"round project {result['folder']}: {result['items']} items by {method}; ranking in {result['ranking']}")

    @sub.command("round")
    @friendly_errors
    def round_(
        project: ProjectArg,
        run: Annotated[Path | None, typer.Option(help="Run folder whose eval report gives the metrics.")] = None,
        metric: Annotated[list[str] | None, typer.Option(help="name=value (repeatable).")] = None,
        note: Annotated[str, typer.Option()] = "",
    ) -> None:
        """Record the model's metric after this round (the report shows how it moves round by round)."""
        from domaintune.annotate.project import Project
        from domaintune.annotate.report import add_round, metrics_of_run

        p = Project(project)
        metrics = metrics_of_run(run) if run else {}
        for m in metric or []:
            k, _, v = m.partition("=")
            metrics[k] = float(v)
        entry = add_round(p, metrics, labelled=len(p.complete()), note=note)
        _say(f"round {entry['round']}: {json.dumps(entry['metrics'])}")
