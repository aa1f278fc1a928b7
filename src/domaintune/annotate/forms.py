"""Self-contained HTML forms (no server): one labelling form per annotator with only their items and no one
else's labels, and one arbitration form for experts with the disputed items. Each downloads a JSON file that
`domaintune annotate import` / `annotate decide` read back.

Spans: select text in the field and press an entity button; a span is shown under the text and can be removed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from domaintune.annotate.project import Project

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}.item{border-top:1px solid #ccc;
padding:.6em 0}pre{white-space:pre-wrap;background:#f7f7f7;padding:.4em}fieldset{border:1px solid #ddd;margin:.3em 0}
.spans span{background:#ffe9a8;margin-right:.4em;padding:0 .2em}#status{color:#555}.vals{color:#444}"""

_SCRIPT = """
const ctx = JSON.parse(document.getElementById('ctx').textContent);
function spansOf(el){ return JSON.parse(el.dataset.spans || '[]'); }
function drawSpans(el){ const out = el.parentElement.querySelector('.spans'); const text = el.dataset.text;
  out.innerHTML = ''; spansOf(el).forEach((s, k) => { const b = document.createElement('span');
  b.textContent = s[2] + ': ' + text.slice(s[0], s[1]) + ' ✕'; b.onclick = () => { const all = spansOf(el);
  all.splice(k, 1); el.dataset.spans = JSON.stringify(all); drawSpans(el); }; out.appendChild(b); }); }
document.querySelectorAll('button.ent').forEach(btn => btn.onclick = () => {
  const el = document.getElementById(btn.dataset.target); const sel = window.getSelection();
  if (!sel.rangeCount || !el.contains(sel.anchorNode)) { alert('Select text in the field first.'); return; }
  const r = sel.getRangeAt(0); const pre = document.createRange(); pre.selectNodeContents(el);
  pre.setEnd(r.startContainer, r.startOffset); const start = pre.toString().length;
  const end = start + r.toString().length; if (end <= start) return;
  const all = spansOf(el); all.push([start, end, btn.dataset.label]); el.dataset.spans = JSON.stringify(all);
  drawSpans(el); });
function valueOf(box, spec){
  if (spec.kind === 'single' || spec.kind === 'term') { const c = box.querySelector('[name="' + box.id + '"]:checked')
    || box.querySelector('select'); return c && c.value ? c.value : null; }
  if (spec.kind === 'multi') return [...box.querySelectorAll('input:checked')].map(c => c.value);
  if (spec.kind === 'spans') return spansOf(box.querySelector('.spantext'));
  const t = box.querySelector('textarea').value; return t.trim() ? t : null; }
function collect(){ const out = []; let done = 0;
  document.querySelectorAll('.item').forEach(it => { const labels = {}; let full = true;
    it.querySelectorAll('.q').forEach(box => { const spec = ctx.specs[box.dataset.field];
      const v = valueOf(box, spec); if (ctx.mode === 'decide') { if (v !== null) out.push({item: it.dataset.id,
      field: box.dataset.field, value: v}); return; } labels[box.dataset.field] = v;
      if (spec.required && (v === null || (Array.isArray(v) && !v.length && spec.kind !== 'spans'))) full = false; });
    if (ctx.mode === 'label') { out.push({item: it.dataset.id, labels}); if (full) done++; } });
  document.getElementById('status').textContent = ctx.mode === 'label' ? done + ' / ' + ctx.n + ' complete' : '';
  return out; }
document.addEventListener('change', collect); collect();
document.getElementById('dl').onclick = () => { const doc = {project: ctx.project, mode: ctx.mode};
  doc[ctx.mode === 'label' ? 'annotator' : 'expert'] = ctx.who;
  doc[ctx.mode === 'label' ? 'labels' : 'decisions'] = collect();
  const blob = new Blob([JSON.stringify(doc, null, 1)], {type: 'application/json'});
  const a = document.createElement('a'); a.href = URL.createObjectURL(blob);
  a.download = ctx.project + '-' + ctx.mode + '-' + ctx.who + '.json'; a.click(); };
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _question(project: Project, spec, item: dict[str, Any], key: str) -> str:
    head = f'<fieldset class="q" id="{key}" data-field="{_e(spec.name)}"><legend>{_e(spec.name)} ({spec.kind})</legend>'
    if spec.kind == "single":
        body = "".join(
            f'<label><input type="radio" name="{key}" value="{_e(v)}"> {_e(v)}</label> ' for v in spec.labels
        )
    elif spec.kind == "multi":
        body = "".join(f'<label><input type="checkbox" value="{_e(v)}"> {_e(v)}</label> ' for v in spec.labels)
    elif spec.kind == "term":
        opts = "".join(f'<option value="{_e(c)}">{_e(c)} {_e(n)}</option>' for c, n in project.codes[spec.name].items())
        body = f'<select><option value="">—</option>{opts}</select>'
    elif spec.kind == "spans":
        text = str(item["fields"].get(spec.field, ""))
        buttons = "".join(
            f'<button type="button" class="ent" data-target="{key}-t" data-label="{_e(v)}">{_e(v)}</button> '
            for v in spec.labels
        )
        body = f'<pre class="spantext" id="{key}-t" data-text="{_e(text)}" data-spans="[]">{_e(text)}</pre>{buttons}'
        body += '<div class="spans"></div>'
    else:
        body = f'<textarea rows=4 cols=100 placeholder="corrected {_e(spec.field)}; empty = it is right"></textarea>'
    return head + body + "</fieldset>"


def _page(project: Project, title: str, blocks: list[str], ctx: dict[str, Any]) -> str:
    ctx = {**ctx, "project": project.task.name, "specs": {s.name: s.model_dump(mode="json") for s in project.specs}}
    data = json.dumps(ctx, ensure_ascii=False).replace("</", "<\\/")
    guide = f"<p>{_e(project.task.instructions)}</p>" if project.task.instructions else ""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_e(title)}</title><style>{_STYLE}</style></head>'
        f"<body><h1>{_e(title)}</h1>{guide}<p><span id=status></span></p>{''.join(blocks)}"
        f"<p><button id=dl>Download JSON</button> and send the file back.</p>"
        f'<script type="application/json" id="ctx">{data}</script><script>{_SCRIPT}</script></body></html>\n'
    )


def _fields(project: Project, item: dict[str, Any]) -> str:
    return "".join(f"<b>{_e(f)}</b><pre>{_e(item['fields'].get(f, ''))}</pre>" for f in project.task.show)


def label_form(project: Project, annotator: str) -> str:
    """The labelling form of one annotator: their items only, no other labels."""
    blocks = []
    for k, item in enumerate(project.items_of(annotator)):
        qs = "".join(_question(project, s, item, f"i{k}-{j}") for j, s in enumerate(project.specs))
        blocks.append(
            f'<div class="item" data-id="{_e(item["id"])}"><h3>{k + 1}. {_e(item["id"])}</h3>{_fields(project, item)}{qs}</div>'
        )
    ctx = {"mode": "label", "who": annotator, "n": len(blocks)}
    return _page(project, f"{project.task.name}: labels of {annotator}", blocks, ctx)


def arbitration_form(project: Project, expert: str) -> str:
    """The disputed items with each annotator's value; the expert picks (or writes) the final value."""
    blocks = []
    for k, entry in enumerate(project.queue()):
        item = project.items[entry["item"]]
        qs = []
        for j, field in enumerate(entry["fields"]):
            spec = project.task.spec(field)
            shown = "".join(
                f"<li>{_e(a)}: {_e(json.dumps(v, ensure_ascii=False))}</li>" for a, v in entry["values"][field].items()
            )
            qs.append(
                f'<div class="vals">annotators said:<ul>{shown}</ul></div>'
                + _question(project, spec, item, f"i{k}-{j}")
            )
        blocks.append(
            f'<div class="item" data-id="{_e(item["id"])}"><h3>{k + 1}. {_e(item["id"])}</h3>{_fields(project, item)}{"".join(qs)}</div>'
        )
    ctx = {"mode": "decide", "who": expert, "n": len(blocks)}
    return _page(project, f"{project.task.name}: arbitration by {expert}", blocks, ctx)


def write_forms(project: Project, out_dir: Path, expert: str | None = None) -> dict[str, str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for annotator in project.task.annotators:
        path = out_dir / f"label-{annotator}.html"
        path.write_text(label_form(project, annotator), encoding="utf-8")
        files[annotator] = str(path)
    for who in [expert] if expert else project.task.arbitration.experts:
        path = out_dir / f"arbitrate-{who}.html"
        path.write_text(arbitration_form(project, who), encoding="utf-8")
        files[f"arbitration:{who}"] = str(path)
    return files


def read_form_file(path: Path) -> dict[str, Any]:
    """A downloaded form file: {project, mode, annotator|expert, labels|decisions}."""
    from domaintune.errors import UserError

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a form download ({exc})") from None
    if not isinstance(doc, dict) or doc.get("mode") not in ("label", "decide"):
        raise UserError(f"{path}: not a domaintune annotation form download")
    return doc
