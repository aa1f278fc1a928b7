"""A new user's walk through the studio in Debian's Chromium: upload -> configure -> data -> a finished
tiny-model run -> eval -> blind review by two reviewers with kappa -> key creation -> arena -> feedback.

Screenshots of every screen land in `<tmp_path>/screenshots/` (the path is printed; run with -s to see it).
"""

from __future__ import annotations

import os
import random
import time

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)

DEPARTMENTS = ["内科", "外科", "儿科"]
WORDS = [
    "发烧",
    "咳嗽",
    "胰岛素",
    "剂量",
    "肾脏",
    "肝脏",
    "哮喘",
    "过敏",
    "偏头痛",
    "维生素",
    "睡眠",
    "焦虑",
    "血压",
    "血糖",
]

# The walk runs on the tiny model in the suite; DOMAINTUNE_STUDIO_TEST_MODEL=smollm2-135m-instruct repeats
# it on the bundled model (for screenshots of real answers).
MODEL = os.environ.get("DOMAINTUNE_STUDIO_TEST_MODEL", "tiny-random-llama")

TINY = {
    "model": {"name_or_path": MODEL},
    "data": {
        "dedup": {"near": False},
        "filters": {"outlier_sigma": None},
        "decontaminate": {"enabled": False},
    },
    "train": {
        "method": "lora",
        "max_steps": 6,
        "eval_steps": 2,
        "save_steps": 2,
        "batch_size": 2,
        "max_length": 64,
        "precision": "fp32",
        "logging_steps": 1,
        "max_val_samples": 4,
    },
    "eval": {
        "max_items": 4,
        "max_general_items": 2,
        "decoding": {"max_new_tokens": 6, "batch_size": 4},
        "robustness": {"enabled": False},
        "bootstrap_samples": 100,
        "gates": [],
    },
    "export": {"gguf": [], "int8": False, "eval_rows": 2, "eval_items": 0, "speed_prompts": 1, "speed_new_tokens": 4},
}


def _csv_gb18030(path, n=60):
    rng = random.Random(0)
    lines = ["编号,科室,问题,回答"]
    for i in range(n):
        w = rng.sample(WORDS, 4)
        lines.append(
            f"q{i},{DEPARTMENTS[i % 3]},病人{i}问：{w[0]}和{w[1]}怎么办？,关于{w[2]}，请注意{w[3]}，第{i}例需要休息和复诊。"
        )
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("gb18030"))


class Walk:
    def __init__(self, base, browser, shots):
        self.base, self.browser, self.shots = base, browser, shots
        shots.mkdir(parents=True, exist_ok=True)
        self.taken = []

    def login(self, name, password):
        context = self.browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        page.goto(self.base + "/")
        page.fill("#username", name)
        page.fill("#password", password)
        page.click("#login")
        page.wait_for_load_state()
        return page

    def shot(self, page, name):
        path = self.shots / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)


def _configure(page, base, project_yaml):
    page.goto(base + "/p/clinic/config")
    page.fill("input[name='seed']", "abc")
    page.click("#apply-form")
    assert "seed: Input should be a valid integer" in page.inner_text("#config-errors")
    page.goto(base + "/p/clinic/config")
    page.fill("input[name='model.name_or_path']", MODEL)
    page.click("#apply-form")
    page.wait_for_selector("#saved")
    data = yaml.safe_load(project_yaml.read_text(encoding="utf-8"))
    assert data["model"]["name_or_path"] == MODEL
    for section, values in TINY.items():
        data[section] = {**(data.get(section) or {}), **values}
    page.fill("#yaml", yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    page.click("#save-yaml")
    page.wait_for_selector("#saved")
    assert page.input_value("input[name='train.max_steps']") == "6"


def _upload_and_map(page, base, csv_path):
    page.goto(base + "/p/clinic/data")
    page.set_input_files("#upload-file", str(csv_path))
    page.click("#upload-btn")
    page.wait_for_selector("#detected-encoding")
    assert page.inner_text("#detected-reader") == "csv"
    assert page.inner_text("#detected-encoding").lower().replace("_", "") in ("gb18030", "gbk", "gb2312")
    page.select_option("#map-instruction", "问题")
    page.select_option("#map-output", "回答")
    page.select_option("#map-id", "编号")
    page.select_option("#map-stratify", "科室")
    assert "病人0问" in page.inner_text("#mapped-preview")


def _wait_job(page, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = page.get_attribute("#job", "data-state")
        if state and state != "running":
            return state
        time.sleep(1)
    raise AssertionError("job did not finish in time:\n" + page.inner_text("#job-log"))


def _review(walk, base, admin):
    admin.goto(base + "/review")
    admin.click("button.start-review")
    admin.wait_for_selector("#review-link")
    link = admin.get_attribute("#review-link", "href")
    for name in ("rev1", "rev2"):
        admin.goto(base + "/users")
        admin.fill("#user-name", name)
        admin.select_option("#user-role", "reviewer")
        admin.fill("input[name='password']", f"{name}-password")
        admin.click("#add-user")
        admin.wait_for_selector("#created-user")
    patterns = {"rev1": ["A", "B", "A", "tie"], "rev2": ["A", "B", "B", "tie"]}
    for name, picks in patterns.items():
        page = walk.login(name, f"{name}-password")
        assert page.url.endswith("/review")
        assert page.goto(base + "/projects").status == 403  # reviewers see review and arena only
        page.goto(base + link)
        items = page.query_selector_all(".item")
        assert len(items) == 4
        for item, pick in zip(items, picks):
            item.query_selector(f"input[type=radio][value='{pick}']").check()
        page.fill("input[name^='comment-']", f"comment by {name}")
        page.click("#submit-review")
        page.wait_for_selector("#review-saved")
        if name == "rev1":
            walk.shot(page, "review-blind")
        page.context.close()
    admin.goto(base + link + "/results")
    kappa = admin.inner_text("#kappa .kappa")
    assert float(kappa) < 0.85
    assert "reviewers disagree" in admin.inner_text("main")
    assert admin.query_selector_all("#disagreements tr")[1:]
    walk.shot(admin, "review-results")


def _arena_and_feedback(walk, base, admin):
    admin.goto(base + "/p/clinic/arena")
    admin.fill("#arena-prompt", "病人问：发烧怎么办？")
    admin.click("#arena-send")
    admin.wait_for_function(
        "document.querySelector('#answer-left').dataset.done === '1' && document.querySelector('#answer-right').dataset.done === '1'",
        timeout=120_000,
    )
    admin.click("#answer-right ~ details summary")
    admin.fill("#correction-right", "多喝水，休息，体温超过 39 度请就医。")
    admin.click("#save-right")
    admin.wait_for_function("document.querySelector('#saved-right').textContent.includes('studio-')")
    walk.shot(admin, "arena")
    admin.goto(base + "/p/clinic/feedback")
    assert "体温超过 39 度" in admin.inner_text("#feedback")
    admin.check("#feedback input[name='ids']")
    admin.click("#approve")
    admin.wait_for_selector("#exported")
    walk.shot(admin, "feedback")


def test_new_user_walks_from_upload_to_review_keys_and_arena(studio_server, browser, tmp_path):
    base, _app, workspace = studio_server
    walk = Walk(base, browser, tmp_path / "screenshots")
    started = time.time()
    csv_path = tmp_path / "门诊问答.csv"
    _csv_gb18030(csv_path)

    admin = walk.login("boss", "boss-password")
    assert admin.url.endswith("/projects")
    walk.shot(admin, "projects-empty")
    admin.fill("#new-name", "clinic")
    admin.select_option("#new-template", "medical")
    admin.click("#create-project")
    admin.wait_for_url("**/p/clinic/data")

    _configure(admin, base, workspace / "clinic" / "project.yaml")
    walk.shot(admin, "configure")
    admin.click("#estimate-btn")
    admin.wait_for_selector("#estimate table", timeout=60_000)
    walk.shot(admin, "configure-estimate")

    _upload_and_map(admin, base, csv_path)
    walk.shot(admin, "data-mapping")
    admin.click("#save-and-run")
    admin.wait_for_url("**/p/clinic/runs")
    assert _wait_job(admin) == "succeeded"
    admin.goto(base + "/p/clinic/data")
    assert "内科" in admin.inner_text("#strata")
    walk.shot(admin, "data-report")

    admin.goto(base + "/p/clinic/runs")
    admin.click("#start-run")
    admin.wait_for_url("**/p/clinic/runs")
    assert _wait_job(admin) == "succeeded", admin.inner_text("#job-log")
    admin.reload()
    admin.wait_for_selector("#chart-loss svg path.series")
    assert "done" in admin.inner_text("#stage-table")
    walk.shot(admin, "runs")

    admin.goto(base + "/p/clinic/eval")
    assert admin.inner_text("#gates") == "passed"
    assert "rougeL_char" in admin.inner_text("#metrics-test")
    walk.shot(admin, "eval")

    _review(walk, base, admin)

    admin.goto(base + "/p/clinic/serving")
    admin.fill("#key-name", "hospital-app")
    admin.fill("#key-daily", "50000")
    admin.click("#create-key")
    secret = admin.inner_text("#key-secret")
    assert secret.startswith("dt-")
    walk.shot(admin, "serving-keys")
    admin.reload()
    assert secret not in admin.content()  # shown once

    _arena_and_feedback(walk, base, admin)

    admin.goto(base + "/p/clinic/registry")
    assert "candidate" in admin.inner_text("#versions")
    walk.shot(admin, "registry")
    admin.goto(base + "/projects")
    admin.click("#lang-zh")
    admin.wait_for_load_state()
    assert "项目" in admin.inner_text("nav.top")
    walk.shot(admin, "projects-zh")
    print(f"\nstudio walk: {time.time() - started:.0f} s; screenshots:")
    for path in walk.taken:
        print(f"  {path}")
