"""Production feedback straight into KTO: a real server on loopback, thumbs up/down over HTTP,
`domaintune feedback export` (unpaired rows beside the DPO pairs), then `method: kto` on its default file."""

from __future__ import annotations

import json

import httpx
import yaml
from openai import OpenAI
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.layout import RunLayout
from domaintune.serve.feedback import PREFERENCE_FILE, UNPAIRED_FILE
from domaintune.train.runner import run_train
from domaintune.utils.io import read_jsonl
from serve_helpers import serve_config
from train_helpers import make_run_dir, tiny_config

QUESTIONS = {
    "q1": "What is your return window?",
    "q2": "Do you ship to Canada?",
    "q3": "Can I cancel my order?",
    "q4": "When will I get my refund?",
    "q5": "Is shipping free?",
}


def _ask_and_rate(run) -> dict[str, tuple[str, str]]:
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    state = build_state(serve_config(run, {"max_context_tokens": 512}))
    key = state.store.create_key("tester")[1]
    asked = {}
    with BackgroundServer(state) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        for name, question in QUESTIONS.items():
            r = client.chat.completions.create(
                model="tiny-random-llama", max_tokens=6, messages=[{"role": "user", "content": question}]
            )
            asked[name] = (r.id, r.choices[0].message.content)
        auth = {"Authorization": f"Bearer {key}"}
        for name, rating, correction in (
            ("q1", -1, "Unused items can be returned within 30 days of delivery."),  # a pair and two KTO rows
            ("q2", +1, None),
            ("q3", +1, None),
            ("q4", -1, None),
            ("q5", +1, None),
            ("q5", -1, None),  # the latest thumbs wins
        ):
            body = {
                "request_id": asked[name][0],
                "rating": rating,
                **({"correction": correction} if correction else {}),
            }
            assert httpx.post(server.url + "/v1/feedback", headers=auth, json=body).status_code == 200
    return asked


def test_thumbs_from_a_live_server_train_kto_end_to_end(tmp_path):
    run = make_run_dir(tmp_path / "run")
    asked = _ask_and_rate(run)
    project = tmp_path / "project.yaml"
    project.write_text(
        yaml.safe_dump({"name": "tiny", "output_dir": str(run), "model": {"name_or_path": "tiny-random-llama"}}),
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["feedback", "export", str(project)])
    assert result.exit_code == 0, result.output

    out = run / "feedback"
    report = json.loads((out / "report.json").read_text())
    assert report["files"]["unpaired"] == str(out / UNPAIRED_FILE)
    unpaired = {(r["request_id"], r["origin"]): r for r in read_jsonl(out / UNPAIRED_FILE)}
    labels = {(rid, origin): row["label"] for (rid, origin), row in unpaired.items()}
    ids = {name: rid for name, (rid, _) in asked.items()}
    assert labels == {
        (ids["q1"], "served"): False,
        (ids["q1"], "correction"): True,
        (ids["q2"], "served"): True,
        (ids["q3"], "served"): True,
        (ids["q4"], "served"): False,
        (ids["q5"], "served"): False,
    }
    q1 = unpaired[(ids["q1"], "served")]
    assert q1["prompt"] == [{"role": "user", "content": QUESTIONS["q1"]}]
    assert q1["completion"] == [{"role": "assistant", "content": asked["q1"][1].strip()}]
    assert report["unpaired_rows"] == 6 and report["unpaired_desirable"] == 3
    assert len(list(read_jsonl(out / PREFERENCE_FILE))) == 1  # corrections keep producing DPO pairs

    cfg = tiny_config(method="kto", batch_size=2)
    metrics = run_train(cfg.model_copy(update={"output_dir": run}), RunLayout(run))
    assert metrics["data"]["train_file"] == str(out / UNPAIRED_FILE)
    assert metrics["data"]["train"]["rows"] == 5 and metrics["data"]["val"]["rows"] == 1
    assert metrics["steps"] == 2 and (run / "model" / "adapter_config.json").is_file()
