"""Commands of the eval stage: `eval CONFIG`, `eval export-review CONFIG`, `eval import-review FILE...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, console, friendly_errors, load
from domaintune.layout import RunLayout


class _EvalGroup(TyperGroup):
    """`domaintune eval CONFIG ...` runs the evaluation; `domaintune eval <subcommand> ...` runs a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_EvalGroup,
    name="eval",
    help="Compare base, tuned and other models on the test and general sets; exit 1 when a gate fails.\n\n"
    "Example: domaintune eval examples/medical-zh.yaml",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


_SUMMARY_METRICS = (
    "rougeL_char",
    "rougeL_word",
    "bleu",
    "chrf",
    "token_f1",
    "term_coverage",
    "accuracy",
    "valid_json",
    "json_field_f1",
    "perplexity",
    "judge_score",
    "tokens_per_s",
    "latency_p95_s",
)


def _print_summary(report: dict[str, Any], layout: RunLayout) -> None:
    for set_name, per_model in report["metrics"].items():
        table = Table(title=f"{set_name} set ({report['sets'][set_name]['n_items']} items)")
        table.add_column("metric")
        for name in per_model:
            table.add_column(name, justify="right")
        deltas = report["deltas"].get(set_name, {})
        for name in deltas:
            table.add_column(f"{name} − base [95% CI]", justify="right")
        for metric in _SUMMARY_METRICS:
            if not any(metric in agg for agg in per_model.values()):
                continue
            cells = [_fmt(agg.get(metric)) for agg in per_model.values()]
            for d in deltas.values():
                x = d.get(metric)
                cells.append(
                    ""
                    if not x
                    else f"{x['delta']:+.3g}"
                    + (f" [{x['ci_low']:+.3g}, {x['ci_high']:+.3g}]" if x.get("ci_low") is not None else "")
                )
            table.add_row(metric, *cells)
        console.print(table)
    _print_sets(report)
    _print_verifiers(report)
    for name, r in report.get("retention", {}).items():
        console.print(f"retention ({name}, {r['metric']} on general): [bold]{_fmt(r['ratio'])}[/]")
    for name, r in report.get("robustness", {}).get("models", {}).items():
        console.print(
            f"robustness ({name}): mean drop {_fmt(r['mean_drop'])} points of {report['robustness']['metric']}"
        )
    from domaintune.eval.engine_check import describe_engine

    for line in describe_engine(report.get("engine")):
        console.print(line, highlight=False)
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    cache = report["cache"]
    console.print(
        f"answers generated {cache['answers_generated']}, reused from cache {cache['answers_reused']}; "
        f"wall time {report['timing']['wall_s']:.1f} s"
    )
    console.print(f"report: {layout.eval_dir / 'report.html'}")


def _print_sets(report: dict[str, Any]) -> None:
    """The sets side by side on the primary metric (each model - base), and the template-learning alarms."""
    metric, sets = report["primary_metric"], report.get("sets", {})
    compared = list(report["deltas"].get("test", {}))
    if not compared:
        return
    table = Table(title=f"sets side by side ({metric})")
    for col in ("set", "kind", "items"):
        table.add_column(col, justify="left" if col != "items" else "right")
    for name in compared:
        table.add_column(f"{name} − base [95% CI]", justify="right")
        table.add_column("concentrated", justify="center")
    for set_name, sec in sets.items():
        cells = [set_name, sec.get("kind", ""), str(sec["n_items"])]
        for name in compared:
            d = sec["deltas"].get(name, {}).get(metric)
            cells.append(
                ""
                if not d
                else f"{d['delta']:+.3g}"
                + (f" [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]" if d.get("ci_low") is not None else "")
            )
            c = sec["concentration"].get(name)
            cells.append("–" if not c else ("YES" if c["flagged"] else "no"))
        table.add_row(*cells)
    console.print(table)
    for set_name, sec in sets.items():
        for name, c in sec["concentration"].items():
            if c["flagged"]:
                parts = [p for p in (c.get("items"), c.get("stratum")) if p and p["flagged"]]
                without = "; ".join(
                    f"without them {p['without']['delta']:+.3g} [{p['without']['ci_low']:+.3g}, {p['without']['ci_high']:+.3g}]"
                    if p["without"].get("ci_low") is not None
                    else f"without them {p['without']['delta']}"
                    for p in parts
                )
                console.print(
                    f"[bold yellow]template-learning alarm[/] ({set_name}, {name}): {'; '.join(c['reasons'])}; {without}",
                    highlight=False,
                )


def _print_verifiers(report: dict[str, Any]) -> None:
    """The domain verifiers' pass rates / rewards per model and each model - base (nothing when none ran)."""
    section = report.get("verifiers")
    if not section:
        return
    from domaintune.eval.report import verifier_rows

    table = Table(title=f"domain verifiers ({section['set']} set, {section['n']} items)")
    table.add_column("measure")
    for name in section["models"]:
        table.add_column(name, justify="right")
    for name in section["deltas"]:
        table.add_column(f"{name} − base [95% CI]", justify="right")
    for row in verifier_rows(section):
        cells = [row["label"]]
        for name in section["models"]:
            ci = row["ci"].get(name)
            cells.append(_fmt(row["values"].get(name)) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""))
        for name in section["deltas"]:
            d = row["deltas"].get(name)
            cells.append(
                ""
                if not d
                else f"{d['delta']:+.3g}"
                + (f" [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]" if d.get("ci_low") is not None else "")
            )
        table.add_row(*cells)
    console.print(table)


@eval_app.command("run")
@friendly_errors
def eval_run(config: ConfigArg, set_: SetOpt = None, output_dir: OutputDirOpt = None) -> None:
    """Evaluate the models in CONFIG (also reachable as plain `domaintune eval CONFIG`).

    Example: domaintune eval examples/medical-zh.yaml --set eval.max_items=20
    """
    from domaintune.eval.runner import run_eval

    cfg = load(config, set_, output_dir)
    report = run_eval(cfg, cfg.layout)
    _print_summary(report, cfg.layout)
    gates = report["gates"]
    if gates["passed"]:
        console.print(f"[bold green]gates passed[/] ({len(gates['results'])} checked)")
        return
    for failure in gates["failures"]:
        console.print(f"[bold red]gate failed:[/] {failure}", highlight=False)
    raise typer.Exit(1)


@eval_app.command("export-review")
@friendly_errors
def export_review_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="Items to export (default eval.review.n_items).")] = None,
    model_a: Annotated[str | None, typer.Option("--a", help="First model (default eval.review.model_a).")] = None,
    model_b: Annotated[str | None, typer.Option("--b", help="Second model (default eval.review.model_b).")] = None,
) -> None:
    """Write a blind A/B review (CSV + self-contained HTML form + a separate answer key).

    Example: domaintune eval export-review examples/medical-zh.yaml --n 20
    """
    from domaintune.eval.review import export_review

    cfg = load(config, set_, output_dir)
    rc = cfg.eval.review
    result = export_review(
        cfg.layout,
        n_items=n or rc.n_items,
        model_a=model_a or rc.model_a,
        model_b=model_b or rc.model_b,
        seed=cfg.seed,
        show_reference=rc.show_reference,
    )
    console.print(f"review {result['review_id']}: {result['n_items']} items")
    console.print(f"  form for reviewers: {result['html']}\n  spreadsheet: {result['csv']}")
    console.print(f"  answer key (keep it from reviewers): {result['key']}")


@eval_app.command("import-review")
@friendly_errors
def import_review_cmd(
    files: Annotated[list[Path], typer.Argument(help="Reviewers' filled CSV files.", show_default=False)],
    key: Annotated[Path | None, typer.Option("--key", help="review_key.json (default: beside the files).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
) -> None:
    """Win rate of each model (95% CI) and Cohen's kappa between reviewers.

    Example: domaintune eval import-review runs/medical-zh/eval/review/review-*.csv
    """
    from domaintune.eval.review import import_review

    result = import_review(files, key)
    table = Table(
        title=f"blind review {result['review_id']}: {result['n_items']} items, {len(result['reviewers'])} reviewer(s)"
    )
    for col in ("model", "win rate", "95% CI", "wins", "ties", "losses"):
        table.add_column(col)
    for model, r in result["win_rates"].items():
        table.add_row(
            model,
            f"{r['win_rate']:.3f}",
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
            str(r["wins"]),
            str(r["ties"]),
            str(r["losses"]),
        )
    console.print(table)
    for a in result["agreement"]:
        console.print(f"kappa {a['reviewers'][0]} vs {a['reviewers'][1]}: {_fmt(a['kappa'])} ({a['n_items']} items)")
    for warning in result["warnings"]:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")


def register(app: typer.Typer) -> None:
    """Adds the eval stage's commands to the root app."""
    app.add_typer(eval_app, name="eval")
