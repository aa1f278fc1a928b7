"""Self-contained HTML report: tables, bar charts (matplotlib PNGs as base64), strata, worst cases."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from jinja2 import Environment, select_autoescape

from domaintune.eval.engine_check import describe_engine

SCORE_METRICS = (
    "rouge1_char",
    "rouge2_char",
    "rougeL_char",
    "rouge1_word",
    "rouge2_word",
    "rougeL_word",
    "bleu",
    "chrf",
    "token_f1",
    "exact_match",
    "term_coverage",
    "accuracy",
    "macro_f1",
    "valid_json",
    "json_field_f1",
)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "AR PL UMing CN",
)


def cjk_font() -> str | None:
    """A installed font that can draw Chinese, if any."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in _CJK_FONTS if name in names), None)


def chart_labels(labels: list[str]) -> tuple[list[str], bool]:
    """Labels as drawn: Chinese labels become S1, S2, ... when no CJK font is installed (the table maps them)."""
    from domaintune.eval.metrics import has_cjk

    if any(has_cjk(label) for label in labels) and cjk_font() is None:
        return [f"S{i + 1}" for i in range(len(labels))], True
    return labels, False


def _grouped_bars(
    groups: list[str],
    series: dict[str, list[float | None]],
    title: str,
    ylabel: str,
    errors: dict[str, list[tuple[float, float] | None]] | None = None,
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups, _ = chart_labels(groups)
    font = cjk_font()
    if font:
        plt.rcParams["font.sans-serif"] = [font, "DejaVu Sans"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.6))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for k, (name, values) in enumerate(series.items()):
        vals = [v if isinstance(v, (int, float)) and not math.isnan(v) else 0.0 for v in values]
        yerr = None
        if errors and errors.get(name):
            lows = [(v - e[0]) if e else 0.0 for v, e in zip(vals, errors[name])]
            highs = [(e[1] - v) if e else 0.0 for v, e in zip(vals, errors[name])]
            yerr = [lows, highs]
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=name, yerr=yerr, capsize=3)
        for bar, v in zip(bars, vals):
            ax.annotate(
                f"{v:.1f}",
                (bar.get_x() + bar.get_width() / 2, v),
                ha="center",
                va="bottom" if v >= 0 else "top",
                fontsize=7,
            )
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _charts(report: dict[str, Any]) -> list[dict[str, str]]:
    return [
        *_score_charts(report),
        *_perplexity_chart(report),
        *_delta_charts(report),
        *_strata_chart(report),
        *_robustness_chart(report),
    ]


def _score_charts(report: dict[str, Any]) -> list[dict[str, str]]:
    """One chart per set: every score metric of every model."""
    charts = []
    for set_name, per_model in report["metrics"].items():
        names = list(per_model)
        metrics = [m for m in SCORE_METRICS if any(m in per_model[n] for n in names)]
        if metrics:
            charts.append(
                {
                    "title": f"{set_name} set: scores per model (0-100)",
                    "png": _grouped_bars(
                        metrics,
                        {n: [per_model[n].get(m) for m in metrics] for n in names},
                        f"{set_name}: metrics per model",
                        "score",
                    ),
                }
            )
    return charts


def _perplexity_chart(report: dict[str, Any]) -> list[dict[str, str]]:
    ppl_sets = [s for s in report["metrics"] if any("perplexity" in v for v in report["metrics"][s].values())]
    if not ppl_sets:
        return []
    names = list(report["models"])
    return [
        {
            "title": "Perplexity of the reference answers (lower is better)",
            "png": _grouped_bars(
                ppl_sets,
                {n: [report["metrics"][s].get(n, {}).get("perplexity") for s in ppl_sets] for n in names},
                "reference perplexity",
                "perplexity",
            ),
        }
    ]


def _delta_charts(report: dict[str, Any]) -> list[dict[str, str]]:
    """One chart per set and model compared with base, with the bootstrap CIs as error bars."""
    charts = []
    for set_name, model, deltas in [(s, m, d) for s, by in report["deltas"].items() for m, d in by.items()]:
        metrics = [m for m in SCORE_METRICS if m in deltas]
        if metrics:
            errs = [
                (deltas[m]["ci_low"], deltas[m]["ci_high"])
                if deltas[m].get("ci_low") is not None and not math.isnan(deltas[m]["ci_low"])
                else None
                for m in metrics
            ]
            charts.append(
                {
                    "title": f"Delta {model} - base on the {set_name} set, with 95% bootstrap CI",
                    "png": _grouped_bars(
                        metrics,
                        {f"{model} - base": [deltas[m]["delta"] for m in metrics]},
                        f"{model} - base",
                        "points",
                        errors={f"{model} - base": errs},
                    ),
                }
            )
    return charts


def _strata_chart(report: dict[str, Any]) -> list[dict[str, str]]:
    strata = report.get("strata") or {}
    if not strata.get("groups"):
        return []
    groups = list(strata["groups"])[:12]
    metric = strata["metric"]
    names = list(report["models"])
    _, mapped = chart_labels(groups)
    return [
        {
            "title": f"{metric} per {strata['field']}"
            + (" (bars labelled S1, S2, ... as in the table: no CJK font installed)" if mapped else ""),
            "png": _grouped_bars(
                groups,
                {n: [strata["groups"][g].get(n, {}).get(metric) for g in groups] for n in names},
                f"{metric} by {strata['field']}",
                metric,
            ),
        }
    ]


def _robustness_chart(report: dict[str, Any]) -> list[dict[str, str]]:
    rob = report.get("robustness", {})
    if not rob.get("models"):
        return []
    kinds = ["clean", *next(iter(rob["models"].values()))["perturbed"].keys()]
    return [
        {
            "title": f"Robustness: {rob['metric']} on clean vs perturbed prompts ({rob['n_items']} items)",
            "png": _grouped_bars(
                kinds,
                {n: [r["clean"], *r["perturbed"].values()] for n, r in rob["models"].items()},
                "robustness",
                rob["metric"],
            ),
        }
    ]


def verifier_rows(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's `verifiers` section as rows for the HTML report and the CLI: label, value per model (with its
    95% interval where there is one) and each model's delta over base (with its paired bootstrap interval)."""
    models: dict[str, dict[str, Any]] = section["models"]
    deltas: dict[str, dict[str, Any]] = section.get("deltas", {})

    def row(label: str, values: dict[str, Any], delta_key: str | None = None, ci: str | None = None) -> dict:
        return {
            "label": label,
            "values": values,
            "ci": {m: s.get(ci) for m, s in models.items()} if ci else {},
            "deltas": {m: d.get(delta_key) for m, d in deltas.items()} if delta_key else {},
        }

    rows = []
    if any("pass_rate" in s for s in models.values()):
        rows.append(
            row("pass rate (all verifiers)", _per_model(models, "pass_rate"), "verifier_pass_rate", "pass_rate_ci95")
        )
        rows.append(row("mean reward", _per_model(models, "reward_mean"), "verifier_reward"))
        names = list(dict.fromkeys(n for s in models.values() for n in s.get("component_pass_rate", {})))
        for name in names:
            rows.append(
                row(f"{name} pass rate", {m: s.get("component_pass_rate", {}).get(name) for m, s in models.items()})
            )
            applicable = {m: s.get("component_applicable", {}).get(name) for m, s in models.items()}
            if any(a is not None and a < section["n"] for a in applicable.values()):
                where = {m: s.get("component_pass_rate_where_applicable", {}).get(name) for m, s in models.items()}
                n_applicable = next(a for a in applicable.values() if a is not None)
                rows.append(row(f"{name} pass rate where it applies ({n_applicable} items)", where))
    if any("reward_model_score" in s for s in models.values()):
        rows.append(row("reward model score", _per_model(models, "reward_model_score"), "reward_model_score"))
    return rows


def _per_model(models: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    return {m: s.get(key) for m, s in models.items()}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation · {{ r.project }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}
th{background:#f3f3f3}.pass{color:#137333;font-weight:bold}.fail{color:#b3261e;font-weight:bold}
.good{color:#137333}.bad{color:#b3261e}pre{white-space:pre-wrap;max-width:360px;margin:0;font-size:12px}
img{max-width:100%;border:1px solid #eee;margin:0.3em 0 1em}.note{color:#555}
</style></head><body>
<h1>Evaluation report · {{ r.project }}</h1>
<p>Gates: {% if r.gates.passed %}<span class="pass">PASSED</span>{% else %}<span class="fail">FAILED</span>{% endif %}
{% if r.gates.results %}<ul>{% for g in r.gates.results %}<li class="{{ 'pass' if g.passed else 'fail' }}">{{ g.gate }} (value {{ fmt(g.value) }})</li>{% endfor %}</ul>{% else %}(no gates configured){% endif %}
{% for f in r.gates.failures %}<div class="fail">{{ f }}</div>{% endfor %}</p>
<h2>Models</h2><table><tr><th>name</th><th>kind</th><th>what</th><th>identity</th></tr>
{% for name, m in r.models.items() %}<tr><td>{{ name }}</td><td>{{ m.kind }}</td><td>{{ m.description }}</td><td><code>{{ m.identity[:60] }}</code></td></tr>{% endfor %}</table>
<p class="note">Decoding: {{ r.decoding }} · sets: {% for n, s in r.sets.items() %}{{ n }} = {{ s.n_items }} items ({{ s.language }}) {% endfor %}
· answers reused from cache: {{ r.cache.answers_reused }}, generated: {{ r.cache.answers_generated }} · wall time {{ fmt(r.timing.wall_s) }} s</p>
{% for line in engine_lines %}<p class="note">{{ line }}</p>{% endfor %}
<p class="note">Latency: {{ r.latency_note }}</p>
{% for note in r.notes %}<p class="note">Note: {{ note }}</p>{% endfor %}
{% set compared = r.deltas.get("test", {}).keys()|list %}{% if compared %}
<h2>Sets side by side ({{ r.primary_metric }})</h2>
<table><tr><th>set</th><th>kind</th><th>items</th>{% for name in compared %}<th>{{ name }} vs base: base → {{ name }}</th><th>{{ name }} − base [95% CI]</th><th>gain concentrated?</th>{% endfor %}</tr>
{% for set_name, s in r.sets.items() %}<tr><td>{{ set_name }}</td><td>{{ s.kind }}</td><td>{{ s.n_items }}</td>
{% for name in compared %}{% set d = s.deltas.get(name, {}).get(r.primary_metric) %}{% set c = s.concentration.get(name) %}<td>{% if d %}{{ fmt(d.base) }} → {{ fmt(d.model) }}{% endif %}</td>
<td class="{{ delta_class(r.primary_metric, d) }}">{% if d %}{{ fmt(d.delta) }}{% if d.ci_low is not none %} [{{ fmt(d.ci_low) }}, {{ fmt(d.ci_high) }}]{% endif %}{% endif %}</td>
<td>{% if c and c.flagged %}<span class="fail">YES</span>{% elif c %}no{% else %}–{% endif %}</td>{% endfor %}</tr>{% endfor %}</table>
<h2>Template-learning alarm (where the gain comes from)</h2>
<p class="note">An alarm sounds when over {{ pct(r.concentration.gain_share) }} of a model's total gain over base ({{ r.primary_metric }}, summed over items) comes from under {{ pct(r.concentration.max_item_share) }} of the items, or over {{ pct(r.concentration.stratum_gain_share) }} from one stratum holding at most {{ pct(r.concentration.max_stratum_item_share) }} of them (eval.concentration): a gain that may be one learnt answer template rather than domain skill.</p>
{% for set_name, s in r.sets.items() %}{% for name, c in s.concentration.items() %}{% set it = c["items"] %}{% set st = c["stratum"] %}
<h3>{{ set_name }} set · {{ name }} − base (mean gain {{ fmt(c.gain) }} over {{ c.n }} items)</h3>
{% if c.flagged %}<p class="fail">ALARM: {{ c.reasons|join("; ") }}</p>{% else %}<p class="note">No alarm{% if c.reasons %} ({{ c.reasons|join("; ") }}){% endif %}{% if it %}: the {{ it.k }} largest gains bring {{ pct(it.share_of_gain) }} of the total ({{ pct(it.share_of_items) }} of the items){% endif %}.</p>{% endif %}
{% if it and it.flagged %}<p>Gain without these {{ it.k }} items: <b>{{ fmt(it.without.delta) }}</b>{% if it.without.ci_low is not none %} [{{ fmt(it.without.ci_low) }}, {{ fmt(it.without.ci_high) }}]{% endif %} on {{ it.without.n }} items.</p>
<table><tr><th>id</th><th>gain</th><th>question</th></tr>{% for i in range(it.ids|length) %}<tr><td>{{ it.ids[i] }}</td><td>{{ fmt(it.deltas[i]) }}</td><td><pre>{{ it.questions[i] }}</pre></td></tr>{% endfor %}</table>{% endif %}
{% if st %}<p>By {{ c.stratum_field }}: {% for v, e in st.by_stratum.items() %}{{ v }} {{ pct(e.share_of_gain) }} of the gain ({{ e.n }} items){% if not loop.last %}, {% endif %}{% endfor %}.
{% if st.flagged %}<b>Gain without {{ c.stratum_field }} {{ st.value }}: {{ fmt(st.without.delta) }}{% if st.without.ci_low is not none %} [{{ fmt(st.without.ci_low) }}, {{ fmt(st.without.ci_high) }}]{% endif %} on {{ st.without.n }} items.</b>{% endif %}</p>{% endif %}
{% endfor %}{% endfor %}{% endif %}
{% for set_name, per_model in r.metrics.items() %}
<h2>{{ set_name }} set: metrics per model</h2>
<table><tr><th>metric</th>{% for name in per_model %}<th>{{ name }}</th>{% endfor %}
{% for name in r.deltas.get(set_name, {}) %}<th>{{ name }} − base [95% CI]</th>{% endfor %}</tr>
{% for metric in metric_names(per_model) %}<tr><td>{{ metric }}</td>{% for name in per_model %}<td>{{ fmt(per_model[name].get(metric)) }}</td>{% endfor %}
{% for name, d in r.deltas.get(set_name, {}).items() %}{% set x = d.get(metric) %}<td class="{{ delta_class(metric, x) }}">{% if x %}{{ fmt(x.delta) }}{% if x.ci_low is not none %} [{{ fmt(x.ci_low) }}, {{ fmt(x.ci_high) }}]{% endif %}{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table>{% endfor %}
{% if r.retention %}<h2>Retention (general set)</h2><table><tr><th>model</th><th>metric</th><th>base</th><th>model</th><th>retention</th><th>general perplexity ratio</th></tr>
{% for name, x in r.retention.items() %}<tr><td>{{ name }}</td><td>{{ x.metric }}</td><td>{{ fmt(x.base) }}</td><td>{{ fmt(x.model) }}</td><td><b>{{ fmt(x.ratio) }}</b></td><td>{{ fmt(x.get('perplexity_ratio')) }}</td></tr>{% endfor %}</table>{% endif %}
{% if r.verifiers %}{% set v = r.verifiers %}<h2>Domain verifiers ({{ v.set }} set, {{ v.n }} items)</h2>
<p class="note">Scored on the answers above{% if v.verifiers %}; verifiers: {% for s in v.verifiers %}{{ s.name or s.type }} ({{ s.type }}){% if not loop.last %}, {% endif %}{% endfor %}{% endif %}{% if v.reward_model %}; reward model: {{ v.reward_model }}{% endif %}. Pass rate with its 95% Wilson interval; each model − base with its 95% paired bootstrap interval.</p>
<table><tr><th>measure</th>{% for name in v.models %}<th>{{ name }}</th>{% endfor %}{% for name in v.deltas %}<th>{{ name }} − base [95% CI]</th>{% endfor %}</tr>
{% for row in verifier_rows(v) %}<tr><td>{{ row.label }}</td>{% for name in v.models %}{% set ci = row.ci.get(name) %}<td>{{ fmt(row["values"].get(name)) }}{% if ci %} [{{ fmt(ci[0]) }}, {{ fmt(ci[1]) }}]{% endif %}</td>{% endfor %}{% for name in v.deltas %}{% set x = row.deltas.get(name) %}<td class="{{ delta_class('verifier', x) }}">{% if x %}{{ fmt(x.delta) }}{% if x.ci_low is not none %} [{{ fmt(x.ci_low) }}, {{ fmt(x.ci_high) }}]{% endif %}{% endif %}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
<h2>Charts</h2>{% for c in charts %}<h3>{{ c.title }}</h3><img alt="{{ c.title }}" src="data:image/png;base64,{{ c.png }}">{% endfor %}
{% if r.strata.groups %}<h2>Per {{ r.strata.field }} ({{ r.strata.metric }})</h2><table><tr><th>chart</th><th>{{ r.strata.field }}</th><th>n</th>{% for name in r.models %}<th>{{ name }}</th>{% endfor %}</tr>
{% for g, e in r.strata.groups.items() %}<tr><td>S{{ loop.index }}</td><td>{{ g }}</td><td>{{ e.n }}</td>{% for name in r.models %}<td>{{ fmt(e.get(name, {}).get(r.strata.metric)) }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if r.robustness.models %}<h2>Robustness ({{ r.robustness.metric }}, {{ r.robustness.n_items }} items)</h2><table><tr><th>model</th><th>clean</th>{% for k in (r.robustness.models.values()|list)[0].perturbed %}<th>{{ k }} (drop)</th>{% endfor %}<th>mean drop</th></tr>
{% for name, x in r.robustness.models.items() %}<tr><td>{{ name }}</td><td>{{ fmt(x.clean) }}</td>{% for k, v in x.perturbed.items() %}<td>{{ fmt(v) }} ({{ fmt(x.drop[k]) }})</td>{% endfor %}<td>{{ fmt(x.mean_drop) }}</td></tr>{% endfor %}</table>
{% if r.robustness.example %}<table><tr><th>perturbation</th><th>example prompt</th></tr>{% for k, v in r.robustness.example.items() %}<tr><td>{{ k }}</td><td><pre>{{ v }}</pre></td></tr>{% endfor %}</table>{% endif %}{% endif %}
<h2>LLM judge</h2>{% if r.judge.skipped %}<p class="note">Skipped: {{ r.judge.skipped }}</p>{% else %}<table><tr><th>model</th><th>mean score (1-5)</th><th>scored</th><th>unparsed</th></tr>
{% for name, j in r.judge.models.items() %}<tr><td>{{ name }}</td><td>{{ fmt(j.judge_score) }}</td><td>{{ j.scored }}</td><td>{{ j.unparsed }}</td></tr>{% endfor %}</table>{% endif %}
{% for title, rows in [("Lowest-scoring items", r.worst.lowest), ("Largest regressions vs base", r.worst.regressions)] %}{% if rows %}
<h2>{{ title }} ({{ r.primary_metric }})</h2><table><tr><th>id</th><th>question</th><th>reference</th>{% for name in r.models %}<th>{{ name }}</th>{% endfor %}</tr>
{% for w in rows %}<tr><td>{{ w.id }}</td><td><pre>{{ w.question }}</pre></td><td><pre>{{ w.reference }}</pre></td>{% for name in r.models %}<td><pre>{{ w.answers.get(name, '') }}</pre><b>{{ fmt(w.scores.get(name)) }}</b></td>{% endfor %}</tr>{% endfor %}</table>{% endif %}{% endfor %}
</body></html>
"""


def _metric_names(per_model: dict[str, dict]) -> list[str]:
    seen: dict[str, None] = {}
    for agg in per_model.values():
        for key in agg:
            seen.setdefault(key, None)
    order = {m: i for i, m in enumerate(SCORE_METRICS)}
    return sorted(seen, key=lambda m: (order.get(m, len(order)), m))


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _delta_class(metric: str, d: dict | None) -> str:
    if not d or d.get("ci_low") is None or (isinstance(d["ci_low"], float) and math.isnan(d["ci_low"])):
        return ""
    lower_better = metric in ("perplexity", "latency_p50_s", "latency_p95_s", "nll_per_token")
    if d["ci_low"] > 0:
        return "bad" if lower_better else "good"
    if d["ci_high"] < 0:
        return "good" if lower_better else "bad"
    return ""


def render_html(report: dict[str, Any]) -> str:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = env.from_string(TEMPLATE)
    return template.render(
        r=report,
        charts=_charts(report),
        fmt=_fmt,
        metric_names=_metric_names,
        delta_class=_delta_class,
        pct=_pct,
        verifier_rows=verifier_rows,
        engine_lines=describe_engine(report.get("engine")),
    )
