"""Several replicas, shared state: two `domaintune serve` processes on one Redis and one PostgreSQL.

The servers are real ones from Debian's packages (redis-server, postgresql), started here on
loopback; the tests skip, saying why, only where those cannot be found.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve_helpers import make_tiny_adapter, start_postgres, start_redis

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    redis_url, redis_proc = start_redis(root / "redis")
    try:
        pg_urls, stop_pg = start_postgres(root / "pg", ("serve", "registry"))
    except BaseException:
        redis_proc.terminate()
        raise
    yield {"redis": redis_url, **pg_urls}
    stop_pg()
    redis_proc.terminate()
    redis_proc.wait(timeout=30)


def _start_replica(project: Path, port: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "domaintune"
    return subprocess.Popen(
        [str(exe), "serve", str(project), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"replica exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"replica not ready in time: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def replicas(services, tmp_path_factory, tiny_model_dir):
    from domaintune.serve.store import Store

    root = tmp_path_factory.mktemp("replicas")
    make_tiny_adapter(tiny_model_dir, root / "adapter-a", seed=1)
    make_tiny_adapter(tiny_model_dir, root / "adapter-b", seed=2)
    serve = {
        "engine": "transformers",
        "store_url": services["serve"],
        "limits_url": services["redis"],
        "key_hash_iterations": 1000,
        "max_context_tokens": 256,
        "default_max_tokens": 8,
        "max_tokens_cap": 32,
        "batch_wait_ms": 20,
        "auth_failures_per_minute": 5,
        "canary": {
            "model": "med",
            "stable": str(root / "adapter-a"),
            "candidate": str(root / "adapter-b"),
            "min_requests": 1000,
            "window": 1000,
            "auto_promote": False,
        },
    }
    project = root / "project.yaml"
    project.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "output_dir": str(root / "run"),
                "model": {"name_or_path": "tiny-random-llama"},
                "serve": serve,
            }
        )
    )
    store = Store(services["serve"], key_hash_iterations=1000)  # creates the tables before both replicas start
    keys = {
        "rpm": store.create_key("rpm", rpm=8)[1],
        "tpm": store.create_key("tpm", tpm=150)[1],
        "alice": store.create_key("alice")[1],
        "admin": store.create_key("ops", is_admin=True)[1],
    }
    # Two ports held open together, then freed: free_port() twice could give the same port twice (the kernel
    # picks a random free one each time, ~1 in 14,000), and the second replica would then fail to bind.
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = [a.getsockname()[1], b.getsockname()[1]]
    logs = [root / "a.log", root / "b.log"]
    procs = [_start_replica(project, port, log) for port, log in zip(ports, logs)]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, proc, log in zip(urls, procs, logs):
            _wait_ready(url, proc, log)
        yield {"urls": urls, "keys": keys, "store": store}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.engine.dispose()


def _spread(urls: list[str], key: str, bodies: list[dict]) -> list[tuple[int, httpx.Response]]:
    """Send the bodies at once, alternating between the replicas; (replica index, response) each."""

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            auth = {"Authorization": f"Bearer {key}"}
            sent = [client.post(urls[i % 2] + CHAT, json=b, headers=auth) for i, b in enumerate(bodies)]
            return list(enumerate(await asyncio.gather(*sent)))

    return [(i % 2, r) for i, r in asyncio.run(run())]


def _body(i: int, max_tokens: int = 8) -> dict:
    return {
        "model": "tiny-random-llama",
        "messages": [{"role": "user", "content": f"question {i}"}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
    }


def test_a_keys_limits_hold_across_both_replicas(replicas):
    urls, keys = replicas["urls"], replicas["keys"]
    # requests per minute, alternating replicas: 8 in all (4 on each), not 8 per replica
    auth = {"Authorization": f"Bearer {keys['rpm']}"}
    codes = [httpx.post(urls[i % 2] + CHAT, json=_body(i, 1), headers=auth, timeout=120).status_code for i in range(12)]
    assert codes == [200] * 8 + [429] * 4
    # tokens per minute, 40 requests at once on both: what they served together stays within the key's 150
    from domaintune.serve.store import utc_day

    days = {utc_day()}
    results = _spread(urls, keys["tpm"], [_body(i) for i in range(40)])
    days.add(utc_day())  # a run across midnight settles usage on both days
    served = [(replica, r.json()["usage"]["total_tokens"]) for replica, r in results if r.status_code == 200]
    assert served and sum(tokens for _, tokens in served) <= 150
    assert {r.status_code for _, r in results} == {200, 429}
    # the usage both replicas settled is in the one PostgreSQL store
    tpm_id = keys["tpm"].split("-")[1]
    settled = sum(replicas["store"].tokens_used_on(tpm_id, day) for day in days)
    assert settled == sum(tokens for _, tokens in served)


def test_canary_decisions_reach_the_other_replica(replicas):
    urls, admin = replicas["urls"], {"Authorization": f"Bearer {replicas['keys']['admin']}"}
    assert httpx.get(urls[1] + "/admin/canary", headers=admin).json()["state"] == "running"
    assert httpx.post(urls[0] + "/admin/canary/rollback", headers=admin).status_code == 200
    deadline = time.monotonic() + 15
    while httpx.get(urls[1] + "/admin/canary", headers=admin).json()["state"] != "rolled_back":
        assert time.monotonic() < deadline, "replica B never saw replica A's rollback"
        time.sleep(0.5)
    r = httpx.post(
        urls[1] + CHAT,
        json={**_body(0, 2), "model": "med", "user": "anyone"},
        headers={"Authorization": f"Bearer {replicas['keys']['alice']}"},
    )
    assert r.status_code == 200 and r.headers["x-domaintune-served"] == "med@stable"


def test_failed_key_checks_are_counted_across_replicas(replicas):
    urls, alice = replicas["urls"], replicas["keys"]["alice"]
    wrong = {"Authorization": f"Bearer {alice.rsplit('-', 1)[0]}-wrong"}
    codes = [httpx.get(urls[0] + "/v1/models", headers=wrong).status_code for _ in range(6)]
    assert codes == [401] * 5 + [429]  # auth_failures_per_minute: 5
    r = httpx.get(urls[1] + "/v1/models", headers=wrong)  # the other replica knows: no hashing, 429
    assert r.status_code == 429 and r.json()["error"]["code"] == "auth_rate_limited"


def test_registry_and_key_store_on_postgresql(services, tmp_path, tiny_model_dir):
    from openai import OpenAI

    from domaintune.registry import ModelRegistry
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state
    from serve_helpers import serve_config

    registry = ModelRegistry(services["registry"], store=tmp_path / "artifacts")
    versions = [
        registry.register("tiny", artifacts={"model": make_tiny_adapter(tiny_model_dir, tmp_path / f"ad{s}", seed=s)})
        for s in (1, 2)
    ]
    registry.promote("tiny", versions[0], alias="production")
    registry.promote("tiny", versions[1], alias="production")
    assert registry.aliases("tiny")["production"] == versions[1]
    assert registry.rollback("tiny", "production")[1] == versions[0]
    registry.record_event("tiny", versions[0], "checked", {"by": "test"})
    assert "checked" in [e["kind"] for e in registry.events("tiny", versions[0])]
    cfg = serve_config(
        tmp_path / "run",
        {"store_url": services["serve"], "models": [{"name": "tiny-prod", "source": "registry://tiny@production"}]},
        registry={"url": services["registry"], "store": str(tmp_path / "artifacts")},
    )
    state = build_state(cfg)
    key = state.store.create_key("pg-user")[1]
    with BackgroundServer(state) as server:
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        r = c.chat.completions.create(model="tiny-prod", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.system_fingerprint == f"tiny-prod@{versions[0]}"
        assert state.store.get_request(r.id) is not None  # the request log is in PostgreSQL
