"""Canary rollout: the controller with injected outcomes, then rollback and promote through real HTTP."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from domaintune.serve.canary import CANDIDATE, PROMOTED, ROLLED_BACK, RUNNING, STABLE, CanaryController
from domaintune.serve.config import CanaryConfig
from serve_helpers import make_tiny_adapter, serve_config


def controller(**kw) -> tuple[CanaryController, list]:
    decisions = []
    cfg = CanaryConfig(
        model="m", stable="s", candidate="c", **{"min_requests": 20, "window": 50, "promote_after": 100, **kw}
    )
    return CanaryController(cfg, on_decision=decisions.append), decisions


def feed(ctl, arm, n, errors=0, start=0):
    """n outcomes with `errors` of them spread evenly through the sequence."""
    every = n // errors if errors else 0
    for i in range(n):
        ctl.record(f"{arm}-{start + i}", arm, error=bool(every) and i % every == every - 1)


def test_routing_is_sticky_and_matches_the_share():
    ctl, _ = controller(candidate_share=0.1)
    arms = [ctl.arm_for(f"user-{i}") for i in range(5000)]
    share = arms.count(CANDIDATE) / len(arms)
    assert 0.08 < share < 0.12
    assert all(ctl.arm_for(f"user-{i}") == arms[i] for i in range(0, 5000, 50))


def test_error_rate_rollback_waits_for_enough_requests():
    ctl, decisions = controller()
    feed(ctl, STABLE, 30, errors=1)  # ~3% errors
    feed(ctl, CANDIDATE, 19, errors=5)  # very bad, but below min_requests
    assert ctl.state == RUNNING and decisions == []
    feed(ctl, CANDIDATE, 1, start=19)  # 20 requests, 25% errors vs 3.3%
    assert ctl.state == ROLLED_BACK
    assert decisions[0].kind == ROLLED_BACK and "error rate" in decisions[0].reason
    assert all(ctl.arm_for(f"user-{i}") == STABLE for i in range(200))


def test_within_margin_keeps_running_then_promotes():
    ctl, decisions = controller(margin=0.05)
    feed(ctl, STABLE, 50, errors=2)  # 4%
    feed(ctl, CANDIDATE, 50, errors=4)  # 8%: worse by 4 points, inside the 5-point margin
    assert ctl.state == RUNNING
    with pytest.raises(ValueError, match="has not passed"):
        ctl.promote()
    feed(ctl, CANDIDATE, 50, errors=4, start=50)  # 100 candidate requests passed
    assert ctl.state == PROMOTED and decisions[-1].kind == PROMOTED and not decisions[-1].manual
    assert all(ctl.arm_for(f"user-{i}") == CANDIDATE for i in range(200))


def test_negative_feedback_rolls_back():
    ctl, decisions = controller()
    feed(ctl, STABLE, 40)
    feed(ctl, CANDIDATE, 40)
    for i in range(40):
        ctl.feedback(f"{STABLE}-{i}", +1 if i % 10 else -1)  # 10% negative
    for i in range(6):
        ctl.feedback(f"{CANDIDATE}-{i}", -1)  # 15%: 5 points worse is still inside the margin
    assert ctl.state == RUNNING
    ctl.feedback(f"{CANDIDATE}-6", -1)  # 17.5% vs 10%
    assert ctl.state == ROLLED_BACK and "negative feedback" in decisions[0].reason


def test_window_slides_old_errors_out():
    ctl, _decisions = controller(window=20, min_requests=20, promote_after=10_000)
    feed(ctl, STABLE, 20)
    feed(ctl, CANDIDATE, 19)  # clean so far
    ctl.record("late-error", CANDIDATE, error=False)
    assert ctl.state == RUNNING
    assert ctl.stats()[CANDIDATE].requests == 20  # the window holds at most 20


# ---- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry_setup(tmp_path_factory, tiny_model_dir):
    from domaintune.registry import ModelRegistry

    root = tmp_path_factory.mktemp("canary")
    registry = ModelRegistry(f"sqlite:///{root / 'registry.db'}", store=root / "artifacts")
    versions = []
    for seed in (1, 2):
        adapter = make_tiny_adapter(tiny_model_dir, root / f"adapter-{seed}", seed=seed)
        versions.append(registry.register("tiny", artifacts={"model": adapter}))
    registry.promote("tiny", versions[0], alias="production")
    registry.promote("tiny", versions[1], alias="candidate")
    return root, registry, versions


def _canary_server(root, run, auto_promote, promote_after):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    cfg = serve_config(
        root / run,
        {
            "canary": {
                "model": "tiny",
                "stable": "registry://tiny@production",
                "candidate": "registry://tiny@candidate",
                "candidate_share": 0.5,
                "min_requests": 4,
                "window": 20,
                "promote_after": promote_after,
                "auto_promote": auto_promote,
            }
        },
        registry={"url": f"sqlite:///{root / 'registry.db'}", "store": str(root / "artifacts")},
    )
    state = build_state(cfg)
    key = state.store.create_key("user")[1]
    admin = state.store.create_key("ops", is_admin=True)[1]
    return cfg, BackgroundServer(state), key, admin


def _ask(c: OpenAI, user: str) -> tuple[str, str]:
    raw = c.chat.completions.with_raw_response.create(
        # greedy: a sampled 3-token answer from the random tiny model is sometimes empty, which the
        # canary rightly counts as a failed answer and which made the promotion test flaky
        model="tiny",
        messages=[{"role": "user", "content": "How do I treat a cold?"}],
        max_tokens=8,
        temperature=0,
        user=user,
    )
    return raw.parse().id, raw.headers["x-domaintune-served"]


def test_candidate_with_bad_feedback_is_rolled_back_over_http(registry_setup):
    root, registry, (v_stable, v_cand) = registry_setup
    cfg, server, key, admin = _canary_server(root, "run-rollback", auto_promote=False, promote_after=1000)
    with server:
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        listed = {m.id: m for m in c.models.list().data}
        assert listed["tiny"].model_extra["canary"]["candidate"] == v_cand
        auth = {"Authorization": f"Bearer {key}"}
        arms: dict[str, str] = {}
        for i in range(60):
            user = f"user-{i}"
            rid, served = _ask(c, user)
            assert _ask(c, user)[1] == served if i < 3 else True  # sticky per user
            arms[user] = served
            rating = -1 if served == "tiny@candidate" else 1
            r = httpx.post(server.url + "/v1/feedback", headers=auth, json={"request_id": rid, "rating": rating})
            assert r.status_code == 200
            if server.state.canary.state != RUNNING:
                break
        status = httpx.get(server.url + "/admin/canary", headers={"Authorization": f"Bearer {admin}"}).json()
        assert status["state"] == ROLLED_BACK and "negative feedback" in status["decision"]["reason"]
        # Every user, including the candidate's, now gets stable.
        cand_users = [u for u, s in arms.items() if s == "tiny@candidate"]
        assert cand_users and all(_ask(c, u)[1] == "tiny@stable" for u in cand_users[:3])
        metrics = httpx.get(server.url + "/metrics").text
        assert 'domaintune_canary_state{model="tiny"} 2.0' in metrics
        assert f'domaintune_canary_rollbacks_total{{model="tiny",version="{v_cand}"}} 1.0' in metrics
        promote = httpx.post(server.url + "/admin/canary/promote", headers={"Authorization": f"Bearer {admin}"})
        assert promote.status_code == 409
    kinds = [e["kind"] for e in registry.events("tiny", v_cand)]
    assert "canary_rolled_back" in kinds
    assert registry.aliases("tiny")["production"] == v_stable
    # The decision survives a restart of the server with the same config.
    from domaintune.serve.state import build_state

    again = build_state(cfg)
    try:
        assert again.canary.state == ROLLED_BACK
    finally:
        again.close()


def test_healthy_candidate_is_promoted_over_http(registry_setup):
    root, registry, (_v_stable, v_cand) = registry_setup
    _cfg, server, key, _admin = _canary_server(root, "run-promote", auto_promote=True, promote_after=5)
    with server:
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        for i in range(80):
            _ask(c, f"user-{i}")
            if server.state.canary.state != RUNNING:
                break
        assert server.state.canary.state == PROMOTED
        assert _ask(c, "user-0")[1] == "tiny@candidate" and _ask(c, "user-1")[1] == "tiny@candidate"
        assert 'domaintune_canary_state{model="tiny"} 3.0' in httpx.get(server.url + "/metrics").text
    assert "canary_promoted" in [e["kind"] for e in registry.events("tiny", v_cand)]
    assert registry.aliases("tiny")["production"] == v_cand  # the stable alias moved to the candidate
