"""The feedback loop end to end: requests and feedback over HTTP, then `domaintune feedback export` and keys CLI."""

from __future__ import annotations

import json

import httpx
import yaml
from openai import OpenAI
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.utils.io import read_jsonl, write_jsonl
from serve_helpers import serve_config

LONG_ZH = "感冒后持续咳嗽两周，夜间加重，伴有少量白痰，没有发烧，请问需要做哪些检查，平时饮食和作息应该注意什么？" * 2
LONG_ZH_ANSWER = (
    "建议先到呼吸科就诊，做血常规和胸片检查，排除支气管炎或肺炎；平时多喝温水，避免辛辣刺激，保证睡眠。" * 2
)


def _unwrapped(output: str) -> str:
    """CLI text with the console's line wrapping undone (it depends on the terminal width)."""
    return " ".join(output.split())


def _write_project(tmp_path) -> tuple:
    run = tmp_path / "run"
    project = {
        "name": "tiny",
        "output_dir": str(run),
        "model": {"name_or_path": "tiny-random-llama"},
        "serve": {"max_context_tokens": 512, "default_max_tokens": 8, "key_hash_iterations": 1000},
    }
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project, allow_unicode=True), encoding="utf-8")
    return path, run


def test_feedback_export_writes_sft_and_preference_rows_deduplicated(tmp_path, tiny_model_dir):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    project, run = _write_project(tmp_path)
    cfg = serve_config(run, {"max_context_tokens": 512})
    state = build_state(cfg)
    key = state.store.create_key("tester")[1]
    asked = {}
    with BackgroundServer(state) as server:
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        for name, question in {
            "q1": "What helps a sore throat?",
            "q2": "Is ibuprofen safe for children?",
            "q3": "How long does flu last?",
            "q4": "Call me at 13812345678 about my test",
            "q5": LONG_ZH,
        }.items():
            # seeded: an unseeded answer of the random tiny model is empty when its first token is the end of
            # turn (2e-5 a request), and an empty answer gives no preference row (the q1 assertions below); its
            # greedy answer to q1 is blank
            r = c.chat.completions.create(
                model="tiny-random-llama",
                max_tokens=6,
                seed=1,
                messages=[{"role": "user", "content": question}],
            )
            asked[name] = (r.id, r.choices[0].message.content)
        assert asked["q1"][1].strip(), "q1 needs a non-empty answer to become a preference pair's rejected side"
        comp = c.completions.create(model="tiny-random-llama", prompt="Aspirin is", max_tokens=4)
        auth = {"Authorization": f"Bearer {key}"}

        def fb(rid, rating, correction=None):
            body = {"request_id": rid, "rating": rating}
            if correction:
                body["correction"] = correction
            assert httpx.post(server.url + "/v1/feedback", headers=auth, json=body).status_code == 200

        fb(asked["q1"][0], -1, "Warm salt-water gargles and rest.")
        fb(asked["q2"][0], -1, "Yes, at the weight-based dose on the label.")  # already in train.jsonl
        fb(asked["q3"][0], +1)  # praise without correction: nothing to learn from
        fb(asked["q4"][0], -1, "First correction")
        fb(asked["q4"][0], -1, "We will call you back on 13812345678 tomorrow.")  # the latest wins
        fb(asked["q5"][0], -1, LONG_ZH_ANSWER)  # a near duplicate of a training row
        fb(comp.id, -1, "a pain reliever.")
    write_jsonl(
        run / "data" / "train.jsonl",
        [
            {
                "id": "t1",
                "source": "x",
                "messages": [
                    {"role": "system", "content": "You are a doctor."},
                    {"role": "user", "content": "Is ibuprofen safe for children?"},
                    {"role": "assistant", "content": "Yes, at the weight-based dose on the label."},
                ],
            },
            {
                "id": "t2",
                "source": "x",
                "messages": [
                    {"role": "user", "content": LONG_ZH.replace("两周", "三周")},
                    {"role": "assistant", "content": LONG_ZH_ANSWER},
                ],
            },
        ],
    )

    result = CliRunner().invoke(app, ["feedback", "export", str(project)])
    assert result.exit_code == 0, result.output
    out = run / "feedback"
    sft = {r["request_id"]: r for r in read_jsonl(out / "sft.jsonl")}
    pref = {r["request_id"]: r for r in read_jsonl(out / "preference.jsonl")}
    report = json.loads((out / "report.json").read_text())
    assert set(sft) == {asked["q1"][0], asked["q4"][0], comp.id}
    assert report["dropped"] == {"exact": 1, "near": 1, "same_as_original": 0}
    row = sft[asked["q1"][0]]
    assert row["messages"] == [
        {"role": "user", "content": "What helps a sore throat?"},
        {"role": "assistant", "content": "Warm salt-water gargles and rest."},
    ]
    assert row["source"] == "feedback" and row["version"] == "base"
    q4 = sft[asked["q4"][0]]["messages"]
    assert "13812345678" not in json.dumps(q4) and "[PHONE]" in q4[0]["content"] and "[PHONE]" in q4[1]["content"]
    assert q4[1]["content"].startswith("We will call you back")
    p1 = pref[asked["q1"][0]]
    assert p1["prompt"] == [{"role": "user", "content": "What helps a sore throat?"}]
    assert p1["chosen"] == [{"role": "assistant", "content": "Warm salt-water gargles and rest."}]
    assert p1["rejected"] == [{"role": "assistant", "content": asked["q1"][1].strip()}]
    assert sft[comp.id]["messages"][0] == {"role": "user", "content": "Aspirin is"}
    assert report["ratings"] == {"positive": 1, "negative": 6}


def test_keys_cli_create_list_revoke(tmp_path):
    from domaintune.config import load_config
    from domaintune.serve.store import Store, default_store_url

    project, _run = _write_project(tmp_path)
    runner = CliRunner()
    made = runner.invoke(
        app,
        ["keys", "create", str(project), "--name", "alice", "--rpm", "5", "--models", "a,b", "--daily-tokens", "1000"],
    )
    assert made.exit_code == 0, made.output
    plaintext = next(line for line in made.output.splitlines() if line.startswith("dt-"))
    store = Store(default_store_url(load_config(project).output_dir), key_hash_iterations=1000)
    key = store.verify(plaintext)
    assert key.name == "alice" and key.rpm == 5 and key.models == ("a", "b") and key.daily_tokens == 1000
    listed = runner.invoke(app, ["keys", "list", str(project)])
    assert listed.exit_code == 0 and plaintext not in listed.output
    row = next(line for line in listed.output.splitlines() if key.id in line)  # the key's table row
    assert "alice" in row
    assert runner.invoke(app, ["keys", "revoke", str(project), "--key", key.id]).exit_code == 0
    assert store.verify(plaintext) is None
    again = runner.invoke(app, ["keys", "revoke", str(project), "--key", key.id])
    assert again.exit_code == 2 and "no active key" in _unwrapped(again.output)
    bad = runner.invoke(app, ["keys", "create", str(project), "--name", "x", "--rpm", "0"])
    assert bad.exit_code == 2 and "--rpm must be a positive integer" in _unwrapped(bad.output)
    assert runner.invoke(app, ["keys", "list"]).exit_code == 2  # neither a project file nor --store


def test_a_store_made_before_tools_were_logged_opens_and_exports(tmp_path):
    """The request log's tool columns came later: an older store gets them on open, its rows read None."""
    import sqlite3

    from domaintune.config import config_from_dict
    from domaintune.serve.feedback import export_feedback
    from domaintune.serve.store import Store

    db = tmp_path / "old.sqlite"
    url = f"sqlite:///{db}"
    store = Store(url, key_hash_iterations=1000)
    fields = {"endpoint": "chat", "model": "m", "served": "m", "version": "base", "status": 200, "outcome": "ok"}
    store.log_request(id="chatcmpl-old", prompt=[{"role": "user", "content": "Hi?"}], response="Hello.", **fields)
    store.add_feedback("chatcmpl-old", None, -1, "Hello, how can I help?", None)
    store.engine.dispose()
    with sqlite3.connect(db) as con:  # the requests table as it was before
        con.execute("ALTER TABLE requests DROP COLUMN tools")
        con.execute("ALTER TABLE requests DROP COLUMN tool_calls")
    con.close()

    row = Store(url, key_hash_iterations=1000).get_request("chatcmpl-old")
    assert row is not None and row.tools is None and row.tool_calls is None and row.response == "Hello."
    with sqlite3.connect(db) as con:
        assert {"tools", "tool_calls"} <= {r[1] for r in con.execute("PRAGMA table_info(requests)")}
    con.close()
    cfg = config_from_dict(
        {"name": "t", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "m"}, "serve": {"store_url": url}}
    )
    export_feedback(cfg, out_dir=tmp_path / "fb")
    [sft] = read_jsonl(tmp_path / "fb" / "sft.jsonl")
    assert "tools" not in sft and sft["messages"] == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello, how can I help?"},
    ]
