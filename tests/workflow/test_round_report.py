"""A round's summary: its lines and the webhook (a failed POST is reported, never fatal)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from domaintune.workflow.round_report import notify, summary_lines, write_summary

SUMMARY = {
    "round": "v0.0.1-abc",
    "status": "candidate",
    "message": "registered v0.0.2_x as candidate, child of v0.0.1_y",
    "feedback": {
        "rows_in_window": 9,
        "requests": 8,
        "train_rows": 5,
        "holdout_rows": 2,
        "dropped_total": 1,
        "dropped": {"vetoed by a reviewer": 1},
    },
    "rows": {"parent_train": 161, "new_rows": 5, "train": 166, "test": 18},
    "comparison": {
        "test": {
            "n_items": 18,
            "primary": {
                "metric": "rougeL_word",
                "base": 10.6,
                "parent": 23.3,
                "child": 24.1,
                "delta": 0.8,
                "ci_low": -1.2,
                "ci_high": 2.9,
            },
        }
    },
    "gates": {"passed": True, "failures": []},
    "canary": {"message": "v0.0.2_x is the candidate"},
}


def test_summary_lines_say_what_happened():
    text = "\n".join(summary_lines(SUMMARY))
    assert "5 trained, 2 held out, 1 dropped" in text
    assert "161 parent rows + 5 new = 166 training rows" in text
    assert "base 10.60, parent 23.30, child 24.10; child - parent +0.80 [-1.20, +2.90]" in text
    assert "gates: passed" in text and "canary: v0.0.2_x is the candidate" in text


def test_webhook_gets_the_summary_and_failures_are_reported(tmp_path):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204 if self.path == "/ok" else 500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert notify(url + "/ok", SUMMARY) is None
        assert received[0]["round"]["status"] == "candidate" and "child - parent" in received[0]["text"]
        assert "500" in (notify(url + "/broken", SUMMARY) or "")
    finally:
        server.shutdown()
    assert notify(None, SUMMARY) is None
    write_summary(tmp_path, None, SUMMARY)
    write_summary(tmp_path, None, {**SUMMARY, "status": "nothing_to_do"})
    assert json.loads((tmp_path / "latest.json").read_text())["status"] == "nothing_to_do"
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2
