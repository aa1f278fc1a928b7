"""Slow serve checks (run with -m slow): the `domaintune serve` command itself, and the bundled model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

pytestmark = pytest.mark.slow


def _wait_ready(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("server not ready in time")


@pytest.mark.parametrize("model", ["tiny-random-llama", "smollm2-135m-instruct"])
def test_serve_command_streams_clean_utf8_and_exits_on_sigterm(tmp_path, model):
    from domaintune.serve.server import free_port

    project = tmp_path / "p.yaml"
    project.write_text(
        yaml.safe_dump(
            {
                "name": "slow",
                "output_dir": str(tmp_path / "run"),
                "model": {"name_or_path": model},
                "serve": {"key_hash_iterations": 1000, "default_temperature": 0},
            }
        )
    )
    exe = Path(sys.executable).parent / "domaintune"
    key = subprocess.run(
        [str(exe), "keys", "create", str(project), "--name", "t"], capture_output=True, text=True, check=True
    ).stdout.strip()
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "serve", str(project), "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        c = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        messages = [{"role": "user", "content": "感冒了应该怎么办？请简短回答。"}]
        full = c.chat.completions.create(model=model, messages=messages, max_tokens=40)
        streamed = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(model=model, messages=messages, max_tokens=40, stream=True)
            if ch.choices
        )
        assert streamed == full.choices[0].message.content
        if model != "tiny-random-llama":  # the real model answers in clean text (no broken characters)
            assert streamed.strip() and "\ufffd" not in streamed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log = proc.stderr.read()
    # uvicorn shuts down gracefully, then re-raises the signal (exit status -15).
    assert proc.returncode in (0, -signal.SIGTERM) and '"event": "stopped"' in log
    assert '"event": "generation"' in log and '"request_id"' in log
