"""Annotation in the studio, in Debian's Chromium: an engineer creates an annotation project from an uploaded task
file, two annotators label blind (one disagreement), kappa and the gate show, an expert arbitrates, finalize is
refused below the gate and then forced; Label Studio files are exported.

Screenshots land in `<tmp_path>/screenshots/` (the path is printed; run with -s to see it).
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.timeout(300)

ITEMS = [
    ("头痛三天怎么办", "多休息。"),
    ("手指割伤流血", "压迫止血。"),
    ("咳嗽发烧两天", "多喝水。"),
]
TASK = """name: triage
instructions: 选择科室；标出症状；需要时更正回答。
sample: {source: qa, seed: 0}
show: [instruction, output]
schema:
  - {name: dept, kind: single, labels: [内科, 外科]}
  - {name: topics, kind: multi, labels: [用药, 饮食], required: false}
  - {name: symptoms, kind: spans, labels: [SYMPTOM], field: instruction}
  - {name: icd10, kind: term, codes: icd.tsv, required: false}
  - {name: fixed_answer, kind: text, field: output, required: false}
output_field: fixed_answer
annotators: [ann_a, ann_b]
min_kappa: 0.85
arbitration: {mode: expert, experts: [dr_wang]}
"""
# per item: dept, topics, symptom span (start, end), icd code
LABELS = {
    "ann_a": [("内科", ["用药"], (0, 2), "R51"), ("外科", [], (2, 4), "S61"), ("内科", ["饮食"], (0, 2), "R05")],
    "ann_b": [("内科", ["用药"], (0, 2), "R51"), ("内科", [], (2, 4), "S61"), ("内科", ["饮食"], (0, 2), "R05")],
}
CORRECTION = "多休息，多喝温水，疼痛加重请就医。"


def _workspace(workspace, tmp_path):
    folder = workspace / "clinic"
    (folder / "tasks").mkdir(parents=True)
    rows = [json.dumps({"q": q, "a": a}, ensure_ascii=False) for q, a in ITEMS]
    (folder / "qa.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "project.yaml").write_text(
        "name: clinic\nmodel: {name_or_path: tiny-random-llama}\n"
        "data:\n  sources:\n    - {name: qa, path: qa.jsonl, fields: {instruction: q, output: a}}\n",
        encoding="utf-8",
    )
    (folder / "tasks" / "icd.tsv").write_text("code\tname\nR51\t头痛\nR05\t咳嗽\nS61\t手腕和手的开放性伤口\n", "utf-8")
    task = tmp_path / "triage.yaml"
    task.write_text(TASK, encoding="utf-8")
    return task


class Walk:
    def __init__(self, base, browser, shots):
        self.base, self.browser, self.shots, self.taken = base, browser, shots, []
        shots.mkdir(parents=True, exist_ok=True)

    def login(self, name):
        page = self.browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
        page.goto(self.base + "/")
        page.fill("#username", name)
        page.fill("#password", f"{name}-password")
        page.click("#login")
        page.wait_for_load_state()
        return page

    def shot(self, page, name):
        path = self.shots / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)


def _label(page, labels, correction):
    items = page.query_selector_all(".item")
    assert len(items) == len(labels)
    for item, (dept, topics, span, code) in zip(items, labels):
        iid = item.get_attribute("data-item")
        item.query_selector(f"input[type=radio][value='{dept}']").check()
        for topic in topics:
            item.query_selector(f"input[type=checkbox][value='{topic}']").check()
        item.query_selector(".spantext").evaluate(
            "(el, s) => { const r = document.createRange(); r.setStart(el.firstChild, s[0]);"
            " r.setEnd(el.firstChild, s[1]); const sel = getSelection(); sel.removeAllRanges(); sel.addRange(r); }",
            list(span),
        )
        item.query_selector("button.ent[data-label='SYMPTOM']").click()
        assert item.query_selector(".span-chip") is not None
        item.query_selector(f"input[name='icd10::{iid}']").fill(code)
    items[0].query_selector("textarea").fill(correction)
    page.click("#save-labels")
    page.wait_for_selector("#labels-saved")
    assert page.inner_text("#labels-saved").endswith(str(len(labels)))
    assert page.query_selector("#label-problems") is None


def _create(walk, eng, task_file):
    eng.goto(walk.base + "/p/clinic/annotate")
    eng.set_input_files("#task-upload", str(task_file))
    eng.wait_for_function("document.querySelector('#task-text').value.includes('triage')")
    eng.click("#create-annotation")
    eng.wait_for_url("**/p/clinic/annotate/triage")
    assert [c.inner_text() for c in eng.query_selector_all("#progress td.done")] == ["0", "0"]
    walk.shot(eng, "annotate-created")


def _annotators(walk, base):
    for name in ("ann_a", "ann_b"):
        page = walk.login(name)
        page.goto(base + "/annotate")
        assert page.query_selector(".open-arbitration") is None
        page.click(".open-labels")
        page.wait_for_url("**/label")
        if name == "ann_b":  # blind: nothing of ann_a's labels (nor name) on ann_b's screen
            assert CORRECTION not in page.content() and "ann_a" not in page.content()
        assert page.goto(base + "/p/clinic/annotate/triage/arbitrate").status == 403
        assert page.goto(base + "/p/clinic/annotate/triage").status == 403
        page.goto(base + "/p/clinic/annotate/triage/label")
        no_csrf = page.request.post(base + "/p/clinic/annotate/triage/label", form={"dept::x": "内科"})
        assert no_csrf.status == 403
        _label(page, LABELS[name], CORRECTION)
        walk.shot(page, f"label-{name}")
        page.context.close()


def test_annotation_walk_create_label_blind_kappa_arbitrate_finalize(studio_server, browser, tmp_path):
    base, app, workspace = studio_server
    started = time.time()
    task_file = _workspace(workspace, tmp_path)
    auth = app.state.studio.auth
    auth.add_user("eng", "engineer", "eng-password")
    for name in ("ann_a", "ann_b", "dr_wang"):
        auth.add_user(name, "reviewer", f"{name}-password")
    walk = Walk(base, browser, tmp_path / "screenshots")
    print(f"\nscreenshots: {walk.shots}")

    anonymous = browser.new_context().new_page()
    anonymous.goto(base + "/p/clinic/annotate/triage/label")
    assert "/login" in anonymous.url
    anonymous.context.close()

    eng = walk.login("eng")
    _create(walk, eng, task_file)
    _annotators(walk, base)

    overview = base + "/p/clinic/annotate/triage"
    eng.goto(overview)
    assert [c.inner_text() for c in eng.query_selector_all("#progress td.done")] == ["3", "3"]
    assert float(eng.inner_text("#overall-kappa")) < 0.85
    assert eng.get_attribute("#gate", "data-passed") == "0"
    assert eng.inner_text("#field-kappa tr[data-field='dept'] td.kappa") not in ("", "–")
    assert eng.inner_text("#queue-count") == "1"
    walk.shot(eng, "kappa-gate")
    eng.click("#finalize")
    eng.wait_for_selector("#finalize-error")
    assert "gate" in eng.inner_text("#finalize-error")

    expert = walk.login("dr_wang")
    expert.goto(base + "/annotate")
    expert.click(".open-arbitration")
    dispute = expert.query_selector(".dispute")
    assert [b.inner_text() for b in dispute.query_selector_all(".side-by-side b")] == ["ann_a", "ann_b"]
    dispute.query_selector("input[type=radio][value='\"外科\"']").check()
    dispute.query_selector("input[name^='note::']").fill("割伤属外科")
    walk.shot(expert, "arbitration")
    expert.click("#save-decisions")
    expert.wait_for_selector("#decisions-saved")
    assert expert.query_selector("#queue-empty") is not None
    assert "dr_wang" in expert.inner_text("#decisions td.by")

    eng.goto(overview)
    assert eng.inner_text("#queue-count") == "0"
    eng.check("#force")
    eng.click("#finalize")
    eng.wait_for_selector("#finalized")
    eng.click("#export-ls")
    eng.wait_for_selector("#ls-files")
    assert {"config.xml", "tasks-ann_a.json", "tasks-ann_b.json"} <= set(eng.inner_text("#ls-files").split())
    walk.shot(eng, "finalized")
    eng.click("#lang-zh")
    eng.wait_for_load_state()
    assert "总体 kappa" in eng.inner_text("#agreement")
    walk.shot(eng, "finalized-zh")

    rows = [json.loads(line) for line in (workspace / "clinic").rglob("annotations.jsonl").__next__().open()]
    assert len(rows) == 3
    cut = next(r for r in rows if r["instruction"] == "手指割伤流血")
    assert cut["dept"] == "外科" and cut["annotation"]["decided"]["dept"]["by"] == ["dr_wang"]
    assert next(r for r in rows if r["instruction"] == "头痛三天怎么办")["output"] == CORRECTION
    assert len(walk.taken) == 7
    print(f"annotation walk: {time.time() - started:.1f}s")


def test_annotation_screens_without_a_browser_blind_csrf_and_roles(tmp_path):
    """The same rules over plain HTTP (runs where Chromium is missing): login, CSRF, roles, blindness."""
    import re

    from fastapi.testclient import TestClient

    from domaintune.studio.app import create_app

    workspace = tmp_path / "ws"
    task_file = _workspace(workspace, tmp_path)
    app = create_app(workspace, password_iterations=1000)
    for name, role in (("eng", "engineer"), ("ann_a", "reviewer"), ("ann_b", "reviewer"), ("dr_wang", "reviewer")):
        app.state.studio.auth.add_user(name, role, f"{name}-password")
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    def login(name):
        client = TestClient(app)
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        client.post("/login", data={"csrf": token, "username": name, "password": f"{name}-password", "next": "/"})
        return client, re.search(r'meta name="csrf" content="([^"]+)"', client.get("/annotate").text).group(1)

    assert TestClient(app).get("/p/clinic/annotate", follow_redirects=False).status_code == 303
    eng, csrf = login("eng")
    assert eng.post("/p/clinic/annotate", content="task_text=x", headers=form).status_code == 403
    r = eng.post("/p/clinic/annotate", data={"csrf": csrf, "task_text": task_file.read_text("utf-8")})
    assert r.status_code == 200 and "ann_a" in r.text
    ann_a, csrf_a = login("ann_a")
    page = ann_a.get("/p/clinic/annotate/triage/label").text
    item = re.search(r'data-item="([^"]+)"', page).group(1)
    saved = ann_a.post(
        "/p/clinic/annotate/triage/label",
        data={"csrf": csrf_a, f"dept::{item}": "外科", f"fixed_answer::{item}": "A的秘密更正"},
    )
    assert 'id="labels-saved"' in saved.text
    assert "A的秘密更正" not in login("ann_b")[0].get("/p/clinic/annotate/triage/label").text
    assert ann_a.get("/p/clinic/annotate/triage").status_code == 403
    assert ann_a.get("/p/clinic/annotate/triage/arbitrate").status_code == 403
    assert login("dr_wang")[0].get("/p/clinic/annotate/triage/label").status_code == 403
    incomplete = ann_a.post("/p/clinic/annotate/triage/label", data={"csrf": csrf_a, f"topics::{item}": "用药"})
    assert 'id="label-problems"' in incomplete.text and "dept" in incomplete.text
    assert eng.get("/p/clinic/annotate/..%2Fetc/label").status_code in (400, 404)
