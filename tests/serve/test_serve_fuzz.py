"""Fuzzing the API against its own OpenAPI schema (Schemathesis): no input may get a 5xx.

Every operation of /openapi.json gets bounded examples, valid ones (the schema's bodies, path
parameters) and invalid ones (wrong types, missing fields, out-of-range values), sent with an admin
key to a real server on loopback; any 5xx fails the test with the request that caused it.
"""

from __future__ import annotations

import pytest

from serve_helpers import make_tiny_adapter, serve_config

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (pip install schemathesis)")

EXAMPLES = {"positive": 25, "negative": 15}  # per operation and mode: bounded, about a minute on 2 CPUs


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    root = tmp_path_factory.mktemp("serve_fuzz")
    for seed, name in ((1, "adapter-a"), (2, "adapter-b")):
        make_tiny_adapter(tiny_model_dir, root / name, seed=seed)
    cfg = serve_config(
        root / "run",
        {
            "models": [{"name": "med-a", "source": str(root / "adapter-a")}],
            "canary": {"model": "med", "stable": str(root / "adapter-a"), "candidate": str(root / "adapter-b")},
            "max_tokens_cap": 16,
            "default_max_tokens": 8,
            "auth_failures_per_minute": 10_000,
            "feedback_per_minute": 10_000,
        },
    )
    state = build_state(cfg)
    admin = state.store.create_key("fuzzer", is_admin=True)[1]
    with BackgroundServer(state) as srv:
        srv.admin = admin
        yield srv


def _fuzz(operation, mode, base_url: str, auth: dict[str, str], seen: list) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=EXAMPLES[mode.value],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(base_url=base_url, headers=auth, timeout=60)
        seen.append((operation.label, response.status_code))
        assert response.status_code < 500, f"{response.status_code} for {case.as_curl_command()}:\n{response.text}"

    check()


def served_schema(raw: dict, models: list[str]) -> dict:
    """The server's schema with `model` narrowed to the served names, so generated bodies reach generation."""
    schemas = raw["components"]["schemas"]
    for body in ("ChatBody", "CompletionBody"):
        schemas[body]["properties"]["model"] = {"type": "string", "enum": models}
    return raw


def test_no_input_from_the_schema_gets_a_5xx(fuzzed_server):
    import httpx
    from schemathesis import GenerationMode

    raw = httpx.get(fuzzed_server.url + "/openapi.json").json()
    assert raw["paths"]["/v1/chat/completions"]["post"]["requestBody"]["required"] is True
    schema = schemathesis.openapi.from_dict(served_schema(raw, ["tiny-random-llama", "med-a", "med"]))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13
    seen: list[tuple[str, int]] = []
    auth = {"Authorization": f"Bearer {fuzzed_server.admin}"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, fuzzed_server.url, auth, seen)
    statuses = sorted({status for _, status in seen})
    print(f"schemathesis: {len(seen)} requests over {len(operations)} operations; statuses {statuses}")
    assert all(status < 500 for status in statuses)
    assert {200, 400} <= set(statuses)  # both valid and invalid inputs were generated
    # The model set the server started with is intact (fuzzed names never matched a served model).
    assert {"med-a", "tiny-random-llama"} <= set(fuzzed_server.state.catalog.models)
