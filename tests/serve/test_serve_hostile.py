"""Hostile and crowded traffic: one regression test per defect found by probing the server as an attacker would.

Each test names the defect it guards against; all of them failed on the server before these fixes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading

import httpx
import pytest

from serve_helpers import make_tiny_adapter, serve_config

CHAT = "/v1/chat/completions"
BASE = "tiny-random-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    root = tmp_path_factory.mktemp("serve_hostile")
    make_tiny_adapter(tiny_model_dir, root / "adapter-a", seed=1)
    make_tiny_adapter(tiny_model_dir, root / "adapter-b", seed=2)
    cfg = serve_config(
        root / "run",
        # the real PBKDF2 cost, so that a flood of wrong keys costs what it would in production
        {
            "key_hash_iterations": 100_000,
            "auth_failures_per_minute": 10,
            "max_pending_key_checks": 8,
            "max_tokens_cap": 64,
        },
    )
    state = build_state(cfg)
    keys = {
        "alice": state.store.create_key("alice")[1],
        "admin": state.store.create_key("admin", is_admin=True)[1],
    }
    with BackgroundServer(state) as srv:
        srv.keys, srv.root, srv.cfg = keys, root, cfg
        yield srv


@pytest.fixture
def fresh_limits(server):
    """Fresh counters before and after a test that trips the failed-auth throttle (all tests share 127.0.0.1)."""
    from domaintune.serve.limits import MemoryLimits

    server.state.limits = MemoryLimits(server.state.store.tokens_used_on)
    yield
    server.state.limits = MemoryLimits(server.state.store.tokens_used_on)


def headers(server, key="alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys.get(key, key)}"}


def ask(content="Hello there", model=BASE, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def new_key(server, **limits) -> str:
    return server.state.store.create_key("k", **limits)[1]


async def _gather_posts(url: str, key: str, bodies: list[dict], path: str = CHAT) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(
            *[client.post(url + path, json=b, headers={"Authorization": f"Bearer {key}"}) for b in bodies]
        )


# ---- one user's request fails other users' requests ----------------------------------------------
def test_a_degenerate_temperature_in_a_batch_fails_nobody(server):
    bodies = [ask(f"question {i}", temperature=1.0, seed=i) for i in range(6)]
    bodies.insert(3, ask("tiny temperature", temperature=1e-45))
    responses = asyncio.run(_gather_posts(server.url, server.keys["alice"], bodies))
    assert [r.status_code for r in responses] == [200] * 7, [r.text for r in responses if r.status_code != 200]


def _engine_run(engine, requests) -> list[tuple[str, object]]:
    """Submit GenRequests at once (so they share a batch) and return each one's final event."""

    async def run():
        for r in requests:
            r.loop = asyncio.get_running_loop()
            engine.submit(r)
        finals = []
        for r in requests:
            while True:
                kind, payload = await asyncio.wait_for(r.events.get(), 60)
                if kind in ("done", "error"):
                    finals.append((kind, payload))
                    break
        return finals

    return asyncio.run(run())


def test_a_failing_row_or_batch_stays_the_failing_requests_own(server):
    from domaintune.serve.engines import GenRequest, SamplingParams

    engine = server.state.engine
    backbone = server.state.catalog.get(BASE).backbone
    ids = server.state.engine.backbone(backbone).tokenizer("Hello there")["input_ids"]

    def req(name, params, prompt=ids):
        return GenRequest(name, backbone, None, list(prompt), params, None, asyncio.Queue())  # type: ignore[arg-type]

    # Sampling that raises for one row (an un-normalised temperature overflows to NaN): that row alone fails.
    rows = [req(f"ok{i}", SamplingParams(max_tokens=3, temperature=1.0, seed=i)) for i in range(3)]
    rows.insert(1, req("bad", SamplingParams(max_tokens=3, temperature=1e-45)))
    finals = _engine_run(engine, rows)
    assert [k for k, _ in finals] == ["done", "error", "done", "done"]
    # A request that breaks the whole forward pass (a token id outside the vocabulary): the others are
    # retried one by one and answered; only the culprit gets the error.
    rows = [req(f"ok{i}", SamplingParams(max_tokens=3, temperature=0.0)) for i in range(3)]
    rows.append(req("breaks-the-batch", SamplingParams(max_tokens=3), prompt=[10**7] * len(ids)))
    finals = _engine_run(engine, rows)
    assert [k for k, _ in finals] == ["done", "done", "done", "error"]


def test_the_llamacpp_engine_keeps_failures_to_their_own_request(tiny_model_dir):
    from domaintune.serve.engines import GenRequest, SamplingParams
    from domaintune.serve.engines.llamacpp import LlamaCppEngine, llamacpp_unavailable_reason

    reason = llamacpp_unavailable_reason()
    if reason:
        pytest.skip(f"llama.cpp cannot run here: {reason}")
    engine = LlamaCppEngine(max_batch_size=8, max_context=256)
    ids = engine.add_backbone("b", tiny_model_dir).tokenizer("Hello there")["input_ids"]
    engine.start()

    def req(name, params, prompt=ids):
        return GenRequest(name, "b", None, list(prompt), params, None, asyncio.Queue())  # type: ignore[arg-type]

    try:
        # A NaN temperature breaks the sampling of a whole decoding step: the others are retried and answered.
        rows = [req(f"ok{i}", SamplingParams(max_tokens=3, temperature=1.0, seed=i)) for i in range(3)]
        rows.insert(1, req("bad", SamplingParams(max_tokens=3, temperature=float("nan"))))
        assert [k for k, _ in _engine_run(engine, rows)] == ["done", "error", "done", "done"]
        # A request that cannot even start (an empty prompt) fails alone.
        rows = [req("empty", SamplingParams(max_tokens=3), prompt=[]), req("ok", SamplingParams(max_tokens=3))]
        assert [k for k, _ in _engine_run(engine, rows)] == ["error", "done"]
    finally:
        engine.stop()


# ---- token limits overshoot under concurrency ----------------------------------------------------
def _served_tokens(responses: list[httpx.Response]) -> int:
    return sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)


def test_64_parallel_requests_never_exceed_tpm_or_the_daily_quota(server, one_utc_day):
    bodies = [ask(f"parallel question {i}", max_tokens=8, temperature=1.0, seed=i) for i in range(64)]
    for limits, limit in (({"tpm": 200}, 200), ({"daily_tokens": 300}, 300)):
        responses = asyncio.run(_gather_posts(server.url, new_key(server, **limits), bodies))
        codes = {r.status_code for r in responses}
        assert codes <= {200, 429} and 200 in codes and 429 in codes
        assert _served_tokens(responses) <= limit


def test_rpm_holds_under_concurrency_and_the_daily_quota_sequentially(server, one_utc_day):
    responses = asyncio.run(_gather_posts(server.url, new_key(server, rpm=10), [ask(max_tokens=1)] * 30))
    assert sum(r.status_code == 200 for r in responses) == 10
    key = new_key(server, daily_tokens=100)
    served = 0
    for _ in range(10):
        r = httpx.post(server.url + CHAT, json=ask(max_tokens=8), headers={"Authorization": f"Bearer {key}"})
        if r.status_code != 200:
            assert r.status_code == 429 and r.json()["error"]["code"] == "daily_quota_exceeded"
            break
        served += r.json()["usage"]["total_tokens"]
    assert 0 < served <= 100


# ---- wrong-secret requests: CPU DoS and an oracle --------------------------------------------------
def test_unknown_key_ids_cost_the_same_hash_as_known_ones(server, monkeypatch):
    from domaintune.serve import store as store_module

    calls = []
    real = store_module._hash_secret
    monkeypatch.setattr(store_module, "_hash_secret", lambda *a: calls.append(a[2]) or real(*a))
    store = server.state.store
    alice_id = server.keys["alice"].split("-")[1]
    for presented in (f"dt-{alice_id}-wrong-secret", "dt-00000000-wrong-secret", "not-a-key", "dt-x"):
        calls.clear()
        assert store.verify(presented) is None
        assert calls == [100_000], presented  # one full-cost hash, whether the id exists or not


def _flood_while_hashing(server, flood_headers: list[dict[str, str]], hashing, release) -> tuple[list, list[int]]:
    """Send a flood at once and, while one of its key hashes is held in progress (`hashing` set, waiting on
    `release`), 10 requests of the valid user; (flood responses, the user's status codes)."""

    async def run():
        async with httpx.AsyncClient(timeout=60) as client, httpx.AsyncClient(timeout=60) as user:
            flooding = asyncio.gather(*[client.get(server.url + "/v1/models", headers=h) for h in flood_headers])
            try:
                assert await asyncio.to_thread(hashing.wait, 60), "the flood never reached the key check"
                codes = [(await user.get(server.url + "/v1/models", headers=headers(server))).status_code]
                for _ in range(9):
                    await asyncio.sleep(0.02)
                    codes.append((await user.get(server.url + "/v1/models", headers=headers(server))).status_code)
                assert not release.is_set()  # all of them answered while the hash was still in progress
            finally:
                release.set()
            return await flooding, codes

    return asyncio.run(run())


def test_a_wrong_secret_flood_is_throttled_audited_and_does_not_slow_valid_users(
    server, fresh_limits, caplog, monkeypatch
):
    from domaintune.serve import store as store_module

    alice_id = server.keys["alice"].split("-")[1]
    assert httpx.get(server.url + "/v1/models", headers=headers(server)).status_code == 200  # alice is verified
    hashes = []
    hashing, release = threading.Event(), threading.Event()
    real = store_module._hash_secret

    def held_hash(*args):  # the flood's hashes wait on `release`: "slow" is then a hang, not a timing
        hashes.append(1)
        hashing.set()
        release.wait(120)
        return real(*args)

    monkeypatch.setattr(store_module, "_hash_secret", held_hash)

    def guess(i: int) -> dict[str, str]:  # a known key id with ever new wrong secrets
        return {"Authorization": f"Bearer dt-{alice_id}-{i:032d}"}

    with caplog.at_level(logging.WARNING, logger="domaintune.audit"):
        responses, alice_codes = _flood_while_hashing(server, [guess(i) for i in range(200)], hashing, release)
        codes = [r.status_code for r in responses]
        # at most max_pending_key_checks (8) hashes in flight, then at most 10 failures a minute: the rest is 429
        assert set(codes) == {401, 429} and codes.count(401) <= 8 + 10
        later = [httpx.get(server.url + "/v1/models", headers=guess(1000 + i)) for i in range(12)]
    assert len(hashes) <= 8 + 10 + 2, "wrong secrets were hashed without bound"
    throttled = later[-1]
    assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "auth_rate_limited"
    assert int(throttled.headers["retry-after"]) >= 1
    # The valid user is answered while the flood's hashing is in progress: never queued behind it.
    assert alice_codes == [200] * 10
    audited = [r for r in caplog.records if getattr(r, "event", None) == "auth_failed"]
    assert {r.reason for r in audited} >= {"wrong_secret", "throttled"}
    assert all(r.key_id == alice_id and r.client == "127.0.0.1" for r in audited)
    assert all(f"{7:032d}" not in r.getMessage() for r in audited)  # secrets are never logged


def test_key_store_file_is_readable_by_its_owner_only(server):
    db = server.cfg.output_dir / "serve" / "serve.db"
    for path in (db, db.with_name("serve.db-wal")):
        if path.exists():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


# ---- chunked bodies bypass max_body_bytes ----------------------------------------------------------
def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(server):
    sent = [0]

    def chunks():
        for _ in range(30 * 16):  # 30 MB in 64 KiB pieces, no Content-Length
            sent[0] += 65536
            yield b"x" * 65536

    try:
        r = httpx.post(server.url + CHAT, content=chunks(), headers=headers(server), timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    except httpx.TransportError:  # the server answered 413 and closed the connection mid-upload
        pass
    assert sent[0] < 8 * 2**20, f"{sent[0]} bytes were read before the refusal"


# ---- 500 instead of 400 ---------------------------------------------------------------------------
HOSTILE_BODIES = {
    "lone surrogate": b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "surrogate in a key": b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "x"}], "\\udfff": 1}',
    "nested 5000 deep": b"[" * 5000 + b"]" * 5000,
    "nested object": b'{"model": "tiny-random-llama", "x": ' + b'{"a": ' * 100 + b"1" + b"}" * 101,
    "NaN temperature": b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "huge seed": b'{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "x"}], "seed": 1'
    + b"0" * 40
    + b"}",
    "not utf-8": b'{"model": "\xff\xfe"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_malformed_bodies_are_400_with_an_openai_error(server, name):
    r = httpx.post(server.url + CHAT, content=HOSTILE_BODIES[name], headers=headers(server))
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_completion_with_an_empty_prompt_is_400(server):
    r = httpx.post(
        server.url + "/v1/completions", json={"model": BASE, "prompt": "", "max_tokens": 2}, headers=headers(server)
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_prompt"


@pytest.mark.parametrize("name", ["x/../y", "é中文", "a\nb", "__base__", "a b", "", "a" * 200, "/abs", "a//b"])
def test_invalid_model_names_are_400_at_load_and_in_requests(server, name):
    admin = headers(server, "admin")
    r = httpx.post(
        server.url + "/admin/models", json={"name": name, "source": str(server.root / "adapter-a")}, headers=admin
    )
    assert r.status_code == 400, r.text
    r = httpx.post(server.url + CHAT, json=ask(model=name), headers=headers(server))
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert name not in {m["id"] for m in httpx.get(server.url + "/v1/models", headers=headers(server)).json()["data"]}


def test_dotted_names_serve_their_adapter_and_headers_stay_valid(server):
    from domaintune.serve.protocol import header_value

    admin = headers(server, "admin")
    r = httpx.post(
        server.url + "/admin/models", json={"name": "med.v2", "source": str(server.root / "adapter-a")}, headers=admin
    )
    assert r.status_code == 201, r.text
    tuned = httpx.post(server.url + CHAT, json=ask(model="med.v2", temperature=0), headers=headers(server))
    base = httpx.post(server.url + CHAT, json=ask(temperature=0), headers=headers(server))
    assert tuned.status_code == 200 and tuned.headers["x-domaintune-served"] == "med.v2"
    assert tuned.json()["choices"][0]["message"] != base.json()["choices"][0]["message"]
    # Non-Latin-1 and control characters never reach a header raw (they used to drop the connection).
    assert header_value("é中文") == "%C3%A9%E4%B8%AD%E6%96%87" and header_value("a\nb") == "a%0Ab"


def test_hidden_canary_arm_names_are_not_served_directly(server):
    r = httpx.post(server.url + CHAT, json=ask(model="tiny@stable"), headers=headers(server))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model_name"


# ---- others -------------------------------------------------------------------------------------
def test_feedback_is_bounded_in_size_count_and_rate(server):
    key = new_key(server)
    auth = {"Authorization": f"Bearer {key}"}
    rid = httpx.post(server.url + CHAT, json=ask(), headers=auth).json()["id"]
    big = httpx.post(
        server.url + "/v1/feedback", json={"request_id": rid, "rating": -1, "correction": "y" * 15_000}, headers=auth
    )
    assert big.status_code in (400, 413) and big.json()["error"]["code"] in ("feedback_too_long", "request_too_large")
    codes = [
        httpx.post(server.url + "/v1/feedback", json={"request_id": rid, "rating": 1}, headers=auth).status_code
        for _ in range(8)
    ]
    assert codes[:5] == [200] * 5 and set(codes[5:]) == {409}  # at most 5 feedback rows per request
    codes = [
        httpx.post(server.url + "/v1/feedback", json={"request_id": "nope", "rating": 1}, headers=auth).status_code
        for _ in range(30)
    ]
    assert 429 in codes  # 30 feedback posts a minute per key


def test_two_adapters_of_the_same_shape_get_different_versions(server):
    from domaintune.serve.catalog import local_version

    a, b = local_version(server.root / "adapter-a"), local_version(server.root / "adapter-b")
    assert a != b and a == local_version(server.root / "adapter-a")


# ---- tokenising on the event loop -----------------------------------------------------------------
@pytest.fixture(scope="module")
def big_body_server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    cfg = serve_config(tmp_path_factory.mktemp("serve_big") / "run", {"max_body_bytes": 2_000_000})
    state = build_state(cfg)
    key = state.store.create_key("alice")[1]
    with BackgroundServer(state) as srv:
        srv.key = key
        yield srv


def test_healthz_answers_while_the_request_cpu_work_is_in_progress(big_body_server, monkeypatch):
    """Body parsing, chat templates and tokenising run on the CPU pool, never on the event loop: with every
    pool thread held inside that work, /healthz still answers. (Deterministic: the work is held by an event,
    not timed; a latency figure would belong in bench/. Were the work on the loop, the polls would hang.)"""
    from domaintune.serve import generation, routes

    srv = big_body_server
    release, entered = threading.Event(), threading.Semaphore(0)
    threads: list[threading.Thread] = []

    def held(real):
        def work(*args):
            threads.append(threading.current_thread())
            entered.release()
            release.wait(120)
            return real(*args)

        return work

    monkeypatch.setattr(routes, "parse_body", held(routes.parse_body))
    monkeypatch.setattr(generation, "_prompt", held(generation._prompt))
    oversized = [ask("word " * 180_000 + str(i)) for i in range(8)]  # 900 kB each, far over the context
    near_limit = [ask("a " * 9_000 + str(i)) for i in range(8)]  # must really be tokenised to be judged
    work = [ask(f"question {i}", max_tokens=32, temperature=1.0, seed=i) for i in range(16)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            auth = {"Authorization": f"Bearer {srv.key}"}
            load = asyncio.gather(
                *[client.post(srv.url + CHAT, json=b, headers=auth) for b in work + oversized + near_limit]
            )
            try:
                for _ in range(srv.state.scfg.cpu_workers):  # every pool thread is inside request CPU work
                    held = await asyncio.to_thread(entered.acquire, True, 60)
                    assert held, "the CPU pool never held this work: does it block the event loop?"
                for _ in range(20):
                    assert (await client.get(srv.url + "/healthz", timeout=30)).status_code == 200
                    await asyncio.sleep(0.01)
                assert not release.is_set() and len(threads) == srv.state.scfg.cpu_workers  # still held
            finally:
                release.set()
            return await load

    responses = asyncio.run(run())
    assert [r.status_code for r in responses[:16]] == [200] * 16
    assert {r.status_code for r in responses[16:]} == {400}
    assert {r.json()["error"]["code"] for r in responses[16:]} == {"context_length_exceeded"}
    # every body was parsed and every accepted prompt tokenised off the loop, on the pool's threads
    assert len(threads) == 2 * 32 - 8 and srv.thread not in threads
    assert {t.name.split("_")[0] for t in threads} == {"domaintune-cpu"}
