"""data/report.html: funnel, drop reasons, PII, duplicate clusters, length histograms, split sizes, groups,
decontamination, the leakage table and the guards."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import jinja2

from domaintune.utils.io import atomic_write


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _cjk_font() -> str | None:
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    for cand in ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "SimHei", "Source Han Sans SC"):
        if cand in names:
            return cand
    return None


def _ascii_ok(labels) -> bool:
    """Labels can be drawn: all ASCII, or a CJK font is installed (then it is used)."""
    if all(str(x).isascii() for x in labels):
        return True
    font = _cjk_font()
    if font:
        import matplotlib

        matplotlib.rcParams["font.sans-serif"] = [font, *matplotlib.rcParams["font.sans-serif"]]
        return True
    return False


def _plots(report: dict[str, Any], input_lengths, kept_lengths, kept_answer_lengths) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = {}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    stages = [f["stage"] for f in report["funnel"]]
    ax.bar(stages, [f["rows_out"] for f in report["funnel"]], color="#4c78a8")
    ax.set_ylabel("rows remaining")
    ax.set_title("Funnel: rows remaining after each stage")
    ax.tick_params(axis="x", rotation=35)
    plots["funnel"] = _png(fig)

    if input_lengths:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        hi = float(np.quantile(np.asarray(input_lengths), 0.995)) if input_lengths else 1
        bins = np.linspace(0, max(hi, 1), 50).tolist()
        ax.hist(np.clip(input_lengths, 0, hi), bins=bins, alpha=0.6, label="all mapped rows (before filters)")
        if kept_lengths:
            ax.hist(np.clip(kept_lengths, 0, hi), bins=bins, alpha=0.6, label="written (train/val/test)")
        ax.set_xlabel("row length (characters)")
        ax.set_ylabel("rows")
        ax.set_title("Length histogram")
        ax.legend()
        plots["lengths"] = _png(fig)
    if kept_answer_lengths:
        fig, ax = plt.subplots(figsize=(8, 3.0))
        ax.hist(kept_answer_lengths, bins=40, color="#f58518")
        ax.set_xlabel("answer length (characters)")
        ax.set_ylabel("rows")
        ax.set_title("Answer lengths of written rows")
        plots["answers"] = _png(fig)

    per = report["split"]["per_stratum"]
    strata = sorted({k for s in per.values() for k in s})
    if strata:
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(strata) + 1)))
        left = np.zeros(len(strata))
        for split, color in (("train", "#4c78a8"), ("val", "#f58518"), ("test", "#54a24b")):
            vals = np.asarray([per[split].get(k, 0) for k in strata], dtype=float)
            ax.barh(strata, vals, left=left, label=split, color=color)
            left += vals
        ax.set_xlabel("rows")
        ax.set_title(f"Split sizes per stratum ({report['split']['field'] or 'all rows'})")
        ax.legend()
        if not _ascii_ok(strata):
            ax.set_yticks(range(len(strata)), [f"#{i + 1}" for i in range(len(strata))])
            ax.set_ylabel("stratum # (names in the table below)")
        plots["strata"] = _png(fig)
    return plots


_TEMPLATE = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html><head><meta charset="utf-8"><title>domaintune data report — {{ r.project }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ok{color:#1a7f37;font-weight:bold}.bad{color:#c00;font-weight:bold}
.small{font-size:85%;color:#555}img{max-width:100%}
</style></head><body>
<h1>Data report — {{ r.project }}</h1>
<p>Output: <code>{{ r.output_dir }}</code> · format <b>{{ r.format }}</b> · workers {{ r.workers }}</p>
<p>Accounting: input {{ r.totals.input }} = kept {{ r.totals.kept }} + dropped {{ r.totals.dropped }} —
{% if r.balanced %}<span class="ok">balanced</span>{% else %}<span class="bad">NOT balanced</span>{% endif %}
(quarantine.jsonl holds {{ r.totals.quarantined }} rows{% if r.general %}, incl. {{ r.general.input - r.general.written }} from the general set{% endif %}).</p>

<h2>Per source</h2>
<table><tr><th>source</th><th>input</th><th>train</th><th>val</th><th>test</th>{% if r.holdout %}<th>holdout</th>{% endif %}{% if r.holdout and r.holdout.dev %}<th>holdout dev</th>{% endif %}<th>dropped</th><th>check</th><th>drop reasons</th></tr>
{% for name, s in r.sources.items() %}<tr><td>{{ name }}</td><td>{{ s.input }}</td><td>{{ s.kept.train }}</td><td>{{ s.kept.val }}</td>
<td>{{ s.kept.test }}</td>{% if r.holdout %}<td>{{ s.kept.get("holdout", 0) }}</td>{% endif %}{% if r.holdout and r.holdout.dev %}<td>{{ s.kept.get("holdout_dev", 0) }}</td>{% endif %}<td>{{ s.dropped_total }}</td>
<td>{% if s.balanced %}<span class="ok">{{ s.input }} = {{ s.kept_total }} + {{ s.dropped_total }}</span>{% else %}<span class="bad">mismatch</span>{% endif %}</td>
<td class="small">{% for k, v in s.dropped.items() %}{{ k }}: {{ v }}<br>{% endfor %}</td></tr>{% endfor %}
</table>

<h2>Funnel</h2>
<img src="data:image/png;base64,{{ plots.funnel }}">
<table><tr><th>stage</th><th>rows in</th><th>dropped</th><th>changed</th><th>rows out</th><th>note</th></tr>
{% for f in r.funnel %}<tr><td>{{ f.stage }}</td><td>{{ f.rows_in }}</td><td>{{ f.dropped }}</td><td>{{ f.changed if f.changed is defined else "" }}</td>
<td>{{ f.rows_out }}</td><td class="small">{{ f.note }}</td></tr>{% endfor %}
</table>

<h2>Drop reasons</h2>
<table><tr><th>stage: reason</th><th>rows</th></tr>
{% for k, v in r.drop_reasons.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table>

<h2>PII redaction</h2>
<p>Rows changed: {{ r.pii.rows_changed }}</p>
<table><tr><th>type</th><th>redacted</th></tr>
{% for k, v in r.pii.counts.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% else %}<tr><td colspan=2>none found</td></tr>{% endfor %}
</table>

<h2>Duplicates</h2>
<p>Exact duplicates dropped: {{ r.dedup.exact_dropped }} · near duplicates dropped: {{ r.dedup.near_dropped }}
(MinHash {{ r.dedup.num_perm }} perms, threshold {{ r.dedup.threshold }}, LSH {{ r.dedup.bands }}×{{ r.dedup.rows_per_band }}) ·
clusters: {{ r.dedup.clusters }} · largest: {{ r.dedup.largest_cluster }} rows.</p>
{% for c in r.dedup.cluster_sample %}
<table><tr><th colspan=3>cluster of {{ c.size }} — kept <code>{{ c.kept.id }}</code>: {{ c.kept.text }}</th></tr>
{% for d in c.duplicates %}<tr><td><code>{{ d.id }}</code></td><td>{{ d.kind }} {{ d.similarity }}</td><td class="small">{{ d.text }}</td></tr>{% endfor %}
</table>{% endfor %}

<h2>Lengths</h2>
{% if plots.lengths %}<img src="data:image/png;base64,{{ plots.lengths }}">{% endif %}
{% if plots.answers %}<img src="data:image/png;base64,{{ plots.answers }}">{% endif %}
<table><tr><th></th><th>count</th><th>mean</th><th>std</th><th>p5</th><th>median</th><th>p95</th><th>max</th></tr>
{% for k, v in r.lengths.items() %}<tr><td>{{ k }}</td><td>{{ v.count }}</td><td>{{ v.mean }}</td><td>{{ v.std }}</td><td>{{ v.p5 }}</td><td>{{ v.median }}</td><td>{{ v.p95 }}</td><td>{{ v.max }}</td></tr>{% endfor %}
</table>
{% if r.outliers %}<p>Outlier bounds: mean {{ r.outliers.mean }} ± k·σ ({{ r.outliers.std }}) → [{{ r.outliers.low }}, {{ r.outliers.high }}] characters{% if not r.outliers.low %} (no lower bound: mean − k·σ is below 0){% endif %}.</p>{% endif %}

<h2>Split</h2>
<p>By <b>{{ r.split.by }}</b>{% if r.split.field %} on <code>{{ r.split.field }}</code>{% endif %}, ratios {{ r.split.ratios|join(" : ") }}, seed {{ r.split.seed }}.
Sizes: {% for k, v in r.split.sizes.items() %}{{ k }} {{ v }} {% endfor %}{% if sampled %}(before the data.sample caps: {% for k, v in r.split.sizes_before_sampling.items() %}{{ k }} {{ v }} {% endfor %}){% endif %}.</p>
{% if r.holdout %}{% set h = r.holdout %}<p>Held out of train/val/test (data.split.holdout_group <b>{{ h.name }}</b>): rows whose <code>{{ h.field }}</code> is {% if h.after %}after {{ h.after }}{% else %}one of {{ h['values']|join(", ") }}{% endif %}:
{{ h.rows }} rows written to <code>{{ h.file }}</code>{% if h.max_rows %} (of {{ h.before_sampling }}, capped at {{ h.max_rows }}){% endif %}; train and val rows repeating one of their prompts are dropped (decontamination).
{% if h.dev %}Set aside first for choosing recipes (holdout_group.dev_rows {{ h.dev.dev_rows }}, whole prompt groups, before max_rows): {{ h.dev.drawn }} rows, {{ h.dev.rows }} written to <code>{{ h.dev.file }}</code> (eval set <code>{{ h.dev.set }}</code>){% if h.dev.drawn - h.dev.rows %}, {{ h.dev.drawn - h.dev.rows }} dropped repeating a gated holdout prompt{% endif %}; a sweep chooses on them, the gates read the file above.{% endif %}
{% if h.rows_per_value %}Rows per {{ h.field }} before the split: {% for k, v in h.rows_per_value.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.{% endif %}</p>{% endif %}
{% set g = r.split.groups %}{% if g.by %}<p>Rows that share a group stay in one split (group_by {{ g.by|join(", ") }}): {{ g.groups }} groups,
{{ g.rows_in_shared_groups }} rows share a group with another row, the largest holds {{ g.largest }}{% if g.links %} (links: {% for k, v in g.links.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}){% endif %}.</p>{% else %}<p>No grouping (data.split.group_by is empty): every row is placed on its own.</p>{% endif %}
{% set d = r.decontaminate %}<p>Decontamination{% if d.enabled %}: {{ d.dropped }} rows dropped (train {{ d.by_split.train }}, val {{ d.by_split.val }}{% if d.by_split.holdout_dev is defined %}, holdout dev {{ d.by_split.holdout_dev }}{% endif %}{% for k, v in d.by_kind.items() %}; {{ k }} {{ v }}{% endfor %}):
prompts equal after normalisation, near duplicates{% if d.near_threshold %} (similarity ≥ {{ d.near_threshold }}){% endif %}, or sharing a {{ d.ngram }}-gram ({{ d.scope }}); each quarantine row names the row it matched.{% else %} off.{% endif %}</p>
<h3>Leakage: prompts shared between splits, after the stage</h3>
<table><tr><th>rows of</th><th>repeating a prompt of</th><th>rows</th><th>exact</th><th>near{% if r.leakage.near_threshold %} (≥ {{ r.leakage.near_threshold }}){% endif %}</th></tr>
{% for p in r.leakage.pairs %}<tr><td>{{ p.split }}</td><td>{{ p.against }}</td><td>{{ p.rows }}</td>
<td class="{{ 'bad' if p.exact else 'ok' }}">{{ p.exact }}</td><td class="{{ 'bad' if p.near else 'ok' }}">{{ p.near }}</td></tr>{% endfor %}
</table>
<h3>Checks</h3>
{% if r.guards.violations %}<ul>{% for v in r.guards.violations %}<li class="bad">{{ v.message }}</li>{% endfor %}</ul>
<p class="small">data.guards.on_violation: {{ r.guards.on_violation }}</p>{% else %}<p class="ok">All checks passed: no step after cleaning removed more than {{ '%.0f' % (100 * r.guards.max_removed) }}% of a split, every split is within {{ '%.0f' % (100 * r.guards.max_ratio_drift) }} points of its configured share, none is empty.</p>{% endif %}
{% if plots.strata %}<img src="data:image/png;base64,{{ plots.strata }}">{% endif %}
<table><tr><th>#</th><th>stratum</th><th>train</th><th>val</th><th>test</th></tr>
{% for k in strata %}<tr><td>{{ loop.index }}</td><td>{{ k }}</td><td>{{ r.split.per_stratum.train.get(k, 0) }}</td><td>{{ r.split.per_stratum.val.get(k, 0) }}</td><td>{{ r.split.per_stratum.test.get(k, 0) }}</td></tr>{% endfor %}
</table>
{% if r.split.difficulty_tiers %}{% set t = r.split.difficulty_tiers %}<p>Difficulty tiers by {{ t.by }}: easy ≤ {{ '%.0f' % t.easy_max }} &lt; medium ≤ {{ '%.0f' % t.medium_max }} &lt; hard.</p>
<table><tr><th>split</th><th>easy</th><th>medium</th><th>hard</th></tr>
{% for s, d in r.split.difficulty.items() %}<tr><td>{{ s }}</td><td>{{ d.get("easy", 0) }}</td><td>{{ d.get("medium", 0) }}</td><td>{{ d.get("hard", 0) }}</td></tr>{% endfor %}
</table>{% endif %}

{% if r.general %}<h2>General set (replay / forgetting)</h2>
<p><code>{{ r.general.path }}</code>: {{ r.general.input }} instances → {{ r.general.written }} rows: {{ r.general.replay_rows }} in general.jsonl (replay pool), {{ r.general.holdout_rows }} from {{ r.general.holdout_tasks }} held-out tasks in general_holdout.jsonl (retention check; never replayed); dropped {{ r.general.dropped }}.</p>{% endif %}
{% if r.augment %}<h2>Augmentation (train split only)</h2>
<p>{{ r.augment.train_rows_in }} real train rows → {{ r.augment.created }} synthetic rows
({% for k, v in r.augment.by_origin.items() %}{{ k }}: {{ v }} {% endfor %}), {{ r.augment.written }} added to train.jsonl
after decontamination against val/test ({% for k, v in (r.augment.decontaminated or {}).items() %}{{ k }}: {{ v }} {% else %}none{% endfor %} dropped);
{{ r.augment.quarantined }} items in quarantine.jsonl (generator failures, candidates that failed a check, decontaminated rows).
Cache: <code>{{ r.augment.cache }}</code>.</p>
<table><tr><th>#</th><th>op</th><th>created</th><th>from source rows</th><th>rejected (check)</th><th>generator failures</th><th>generator</th><th>examples</th></tr>
{% for o in r.augment.ops %}<tr><td>{{ o.index }}</td><td>{{ o.op }}</td><td>{{ o.created }}</td><td>{{ o.from_rows }}
<div class="small">{{ o.source_ids[:10]|join(", ") }}{% if o.source_ids_total > 10 %}, … ({{ o.source_ids_total }}){% endif %}</div></td>
<td class="small">{% for k, v in o.rejected.items() %}{{ k }}: {{ v }}<br>{% endfor %}</td><td>{{ o.failed }}</td>
<td class="small">{% if o.generator %}generated {{ o.generator.generated }} · cache hits {{ o.generator.cache_hits }} · failed {{ o.generator.failed }}{% endif %}
{% if o.passages is defined %}<br>passages {{ o.passages }}, parsed pairs {{ o.pairs_parsed }}{% endif %}
{% if o.shares_after is defined %}<br>{{ o.field }} shares {{ o.shares_before }} → {{ o.shares_after }}{% endif %}</td>
<td class="small">{% for e in o.examples %}<b>Q:</b> {{ e.question }}<br><b>A:</b> {{ e.answer }}<br><i>from {{ e.derived_from|join(", ") }}</i><br>{% endfor %}</td></tr>{% endfor %}
</table>{% endif %}
</body></html>
"""
)


def write_html_report(report: dict[str, Any], path: Path, input_lengths, kept_lengths, kept_answer_lengths) -> None:
    plots = _plots(report, input_lengths, kept_lengths, kept_answer_lengths)
    strata = sorted({k for s in report["split"]["per_stratum"].values() for k in s})
    sampled = any(v is not None for v in report["sample"].values())
    html = _TEMPLATE.render(r=report, plots=plots, strata=strata, sampled=sampled)
    with atomic_write(path) as fh:
        fh.write(html)
