"""End to end: a real uvicorn server on loopback with the tiny model, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from serve_helpers import make_tiny_adapter, serve_config


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    root = tmp_path_factory.mktemp("serve_api")
    make_tiny_adapter(tiny_model_dir, root / "adapter-a", seed=1)
    make_tiny_adapter(tiny_model_dir, root / "adapter-b", seed=2)
    cfg = serve_config(root / "run", {"models": [{"name": "med-a", "source": str(root / "adapter-a")}]})
    state = build_state(cfg)
    keys = {}
    for name, kwargs in {
        "alice": {},
        "admin": {"is_admin": True},
        "limited": {"models": ["med-a"]},
        "slow": {"rpm": 3},
        "tokens": {"tpm": 60},
        "daily": {"daily_tokens": 80},
        "revoked": {},
    }.items():
        keys[name] = state.store.create_key(name, **kwargs)[1]
    state.store.revoke_key("revoked")
    with BackgroundServer(state) as srv:
        srv.keys = keys
        srv.root = root
        srv.cfg = cfg
        yield srv


def client(server, key="alice") -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=server.keys.get(key, key), max_retries=0)


def chat(c: OpenAI, content="Hello, how are you?", model="med-a", **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_models_lists_base_and_adapter_with_parent(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {"tiny-random-llama", "med-a"}
    assert models["med-a"].model_extra["parent"] == "tiny-random-llama"
    assert models["med-a"].model_extra["kind"] == "adapter"
    assert models["tiny-random-llama"].model_extra["parent"] is None
    # A key restricted to one model sees only that one.
    assert [m.id for m in client(server, "limited").models.list().data] == ["med-a"]


def test_chat_respects_max_tokens_and_reports_usage(server):
    c = client(server)
    r = chat(c, max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.model == "med-a"
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 7
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint.startswith("med-a@local-")


def test_seed_is_reproducible_and_stop_cuts_the_text(server):
    c = client(server)
    a = chat(c, max_tokens=24, temperature=1.0, seed=7).choices[0].message.content
    b = chat(c, max_tokens=24, temperature=1.0, seed=7).choices[0].message.content
    other = chat(c, max_tokens=24, temperature=1.0, seed=8).choices[0].message.content
    assert a == b and a != other
    stop = a[len(a) // 2 : len(a) // 2 + 3]
    r = chat(c, max_tokens=24, temperature=1.0, seed=7, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == a[: a.find(stop)]


def test_adapter_changes_outputs_versus_base(server):
    c = client(server)
    base = chat(c, model="tiny-random-llama", max_tokens=12, temperature=0).choices[0].message.content
    tuned = chat(c, model="med-a", max_tokens=12, temperature=0).choices[0].message.content
    assert base != tuned


def test_streaming_matches_non_streaming_and_ends_with_usage(server):
    c = client(server)
    full = chat(c, max_tokens=12, temperature=1.0, seed=3)
    chunks = list(chat(c, max_tokens=12, temperature=1.0, seed=3, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # Raw SSE: the stream ends with the [DONE] sentinel.
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.keys['alice']}"},
        json={"model": "med-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_completions_plain_and_streaming(server):
    c = client(server)
    r = c.completions.create(model="tiny-random-llama", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.completion_tokens <= 6
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="tiny-random-llama", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_32_concurrent_clients_all_answered_in_batches(server):
    engine = server.state.engine
    before = engine.batches_run

    async def run():
        ac = AsyncOpenAI(base_url=server.url + "/v1", api_key=server.keys["alice"], max_retries=0)
        prompts = [f"Question number {i}: " + "why " * (i % 7) for i in range(32)]
        results = await asyncio.gather(
            *[
                ac.chat.completions.create(
                    model="med-a" if i % 2 else "tiny-random-llama",
                    messages=[{"role": "user", "content": p}],
                    max_tokens=8,
                    temperature=1.0,
                    seed=i,
                )
                for i, p in enumerate(prompts)
            ],
            return_exceptions=True,
        )
        await ac.close()
        return prompts, results

    prompts, results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    assert engine.batches_run - before < 32  # requests were decoded together, not one by one
    # Batching (left padding, mixed adapters) does not change a seeded answer.
    c = client(server)
    for i in (0, 5, 30):
        alone = c.chat.completions.create(
            model="med-a" if i % 2 else "tiny-random-llama",
            messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=8,
            temperature=1.0,
            seed=i,
        )
        assert alone.choices[0].message.content == results[i].choices[0].message.content


def test_openai_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        chat(c, model="no-such-model")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, content="word " * 400, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "256" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, content="word " * 200, max_tokens=60)
    msg = e.value.message
    assert "256" in msg and "60 in the completion" in msg
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, max_tokens=65)
    assert e.value.code == "max_tokens_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, temperature=3.5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="med-a", messages=[])
    headers = {"Authorization": f"Bearer {server.keys['alice']}"}
    bad = httpx.post(server.url + "/v1/chat/completions", headers=headers, content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    big = httpx.post(
        server.url + "/v1/chat/completions",
        headers=headers,
        json={"model": "med-a", "messages": [{"role": "user", "content": "x" * 30_000}]},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert set(big.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/nothing-here", headers=headers).json()["error"]["code"] == "unknown_url"


def test_auth_and_permissions(server):
    with pytest.raises(openai.AuthenticationError) as e:
        chat(client(server, "dt-00000000-wrongsecret"))
    assert e.value.code == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "med-a", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        chat(client(server, "revoked"))
    # A right key id with a wrong secret is rejected too.
    alice = server.keys["alice"]
    with pytest.raises(openai.AuthenticationError):
        chat(client(server, alice[:-1] + ("b" if alice.endswith("a") else "a")))  # (a random secret may end "abc")
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(client(server, "limited"), model="tiny-random-llama")
    assert e.value.code == "model_not_allowed"
    assert chat(client(server, "limited"), max_tokens=2).choices
    # Admin endpoints need an admin key.
    r = httpx.get(server.url + "/admin/models", headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    # Keys are stored only as salted hashes: the secret is nowhere in the database file.
    db = (server.cfg.output_dir / "serve" / "serve.db").read_bytes()
    assert alice.split("-", 2)[2].encode() not in db


def test_rate_limit_token_limit_and_daily_quota(server, one_utc_day):
    slow = client(server, "slow")
    for _ in range(3):
        chat(slow, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        chat(slow, max_tokens=1)
    assert e.value.code == "rate_limit_exceeded"
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60

    tokens = client(server, "tokens")
    chat(tokens, max_tokens=10)  # ~30 prompt tokens + 10
    with pytest.raises(openai.RateLimitError) as e:
        chat(tokens, max_tokens=10)
    assert "tokens per minute" in e.value.message and "retry-after" in e.value.response.headers

    daily = client(server, "daily")
    used = chat(daily, max_tokens=10).usage.total_tokens  # ~30 prompt tokens + at most 10
    with pytest.raises(openai.RateLimitError) as e:
        chat(daily, max_tokens=60 - used)  # reserves more than the 80 - used left
    assert e.value.code == "daily_quota_exceeded"
    assert f"only {80 - used} of the key's 80 tokens are left" in e.value.message
    assert int(e.value.response.headers["retry-after"]) > 0


def test_admin_loads_and_unloads_adapters_at_run_time(server):
    admin = {"Authorization": f"Bearer {server.keys['admin']}"}
    c = client(server)
    r = httpx.post(
        server.url + "/admin/models", headers=admin, json={"name": "med-b", "source": str(server.root / "adapter-b")}
    )
    assert r.status_code == 201, r.text
    assert r.json()["parent"] == "tiny-random-llama"
    assert "med-b" in {m.id for m in c.models.list().data}
    b = chat(c, model="med-b", max_tokens=10, temperature=0).choices[0].message.content
    a = chat(c, model="med-a", max_tokens=10, temperature=0).choices[0].message.content
    assert a != b
    bad = httpx.post(
        server.url + "/admin/models", headers=admin, json={"name": "med-c", "source": str(server.root / "missing")}
    )
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    assert httpx.delete(server.url + "/admin/models/med-b", headers=admin).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        chat(c, model="med-b", max_tokens=2)
    # med-a still works after another adapter was unloaded.
    assert chat(c, model="med-a", max_tokens=10, temperature=0).choices[0].message.content == a


def test_metrics_health_and_readiness(server):
    chat(client(server), max_tokens=2)
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["engine"] == "transformers"
    text = httpx.get(server.url + "/metrics").text
    assert 'domaintune_requests_total{adapter="med-a",endpoint="chat",model="med-a",status="200"' in text
    assert "domaintune_time_to_first_token_seconds_bucket" in text
    assert "domaintune_request_latency_seconds_bucket" in text
    assert 'domaintune_completion_tokens_total{adapter="med-a"' in text
    assert "domaintune_queue_depth" in text
    assert 'status="429"' in text or 'status="404"' in text  # errors are counted by status


def test_requests_are_logged_redacted_and_take_feedback(server):
    c = client(server)
    r = chat(c, content="My email is jane.doe@example.com, what should I do?", max_tokens=4)
    row = server.state.store.get_request(r.id)
    assert row is not None and row.model == "med-a" and row.version.startswith("local-")
    assert "jane.doe@example.com" not in json.dumps(row.prompt)
    assert "[EMAIL]" in row.prompt[0]["content"] and row.pii_counts == {"email": 1}
    headers = {"Authorization": f"Bearer {server.keys['alice']}"}
    ok = httpx.post(
        server.url + "/v1/feedback",
        headers=headers,
        json={"request_id": r.id, "rating": -1, "correction": "See a doctor, call 13812345678."},
    )
    assert ok.status_code == 200 and ok.json()["request_id"] == r.id
    fb = server.state.store.feedback_with_requests()[-1][0]
    assert fb.rating == -1 and "13812345678" not in fb.correction and "[PHONE]" in fb.correction
    assert (
        httpx.post(
            server.url + "/v1/feedback", headers=headers, json={"request_id": "chatcmpl-nope", "rating": 1}
        ).status_code
        == 404
    )
    zero = httpx.post(server.url + "/v1/feedback", headers=headers, json={"request_id": r.id, "rating": 0})
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "rating"
    other = httpx.post(
        server.url + "/v1/feedback",
        headers={"Authorization": f"Bearer {server.keys['limited']}"},
        json={"request_id": r.id, "rating": 1},
    )
    assert other.status_code == 403


def test_grafana_dashboard_queries_only_exported_metrics(server):
    import re
    from pathlib import Path

    dashboard = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "domaintune.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"domaintune_[a-z_]+", e)}
    exported = {family.name for family in server.state.metrics.registry.collect()}
    assert used and used <= exported, used - exported


def test_timeout_gives_504_and_full_queue_gives_503(server):
    c = client(server)
    scfg, engine = server.state.scfg, server.state.engine
    old_timeout, old_queue = scfg.request_timeout_s, engine.max_queue
    try:
        scfg.request_timeout_s = 0.01
        with pytest.raises(openai.InternalServerError) as e:
            chat(c, max_tokens=64)
        assert e.value.status_code == 504 and e.value.code == "timeout"
        scfg.request_timeout_s = old_timeout
        engine.max_queue = 0
        with pytest.raises(openai.InternalServerError) as e:
            chat(c, max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "5"
    finally:
        scfg.request_timeout_s, engine.max_queue = old_timeout, old_queue
    assert chat(c, max_tokens=2).choices  # back to normal
    assert 'type="timeout"' in httpx.get(server.url + "/metrics").text
