"""The main openai-client tests of `test_serve_api` again, on a server with `serve.engine: llamacpp`.

The test functions are imported, so pytest collects them here too and they take this module's `server`
fixture (the same keys, adapters and limits; only the engine differs). The longer ones run with `-m slow`
(all 11 pass on llama.cpp). Skips when llama-cpp-python or llama.cpp's converter is missing.
"""

from __future__ import annotations

import httpx
import pytest
import test_serve_api as api
from test_serve_api import (  # noqa: F401  (collected again here, on the llama.cpp server)
    chat,
    client,
    test_adapter_changes_outputs_versus_base,
    test_chat_respects_max_tokens_and_reports_usage,
    test_completions_plain_and_streaming,
    test_models_lists_base_and_adapter_with_parent,
    test_openai_errors,
)

from serve_helpers import make_tiny_adapter, serve_config


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.engines.llamacpp import llamacpp_unavailable_reason
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    reason = llamacpp_unavailable_reason()
    if reason:
        pytest.skip(f"llama.cpp cannot run here: {reason}")
    root = tmp_path_factory.mktemp("serve_llamacpp")
    make_tiny_adapter(tiny_model_dir, root / "adapter-a", seed=1)
    make_tiny_adapter(tiny_model_dir, root / "adapter-b", seed=2)
    models = [{"name": "med-a", "source": str(root / "adapter-a")}]
    cfg = serve_config(root / "run", {"engine": "llamacpp", "models": models})
    state = build_state(cfg)
    assert state.engine.name == "llamacpp"
    grants = {"alice": {}, "admin": {"is_admin": True}, "limited": {"models": ["med-a"]}}
    keys = {name: state.store.create_key(name, **kwargs)[1] for name, kwargs in grants.items()}
    with BackgroundServer(state) as srv:
        srv.keys = keys
        srv.root = root
        srv.cfg = cfg
        yield srv


def test_readiness_names_the_llamacpp_engine(server):
    chat(client(server), max_tokens=2)
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["engine"] == "llamacpp"


@pytest.mark.slow
def test_seed_and_stop_on_llamacpp(server):
    api.test_seed_is_reproducible_and_stop_cuts_the_text(server)


@pytest.mark.slow
def test_streaming_on_llamacpp(server):
    api.test_streaming_matches_non_streaming_and_ends_with_usage(server)


@pytest.mark.slow
def test_32_concurrent_clients_on_llamacpp(server):
    api.test_32_concurrent_clients_all_answered_in_batches(server)


@pytest.mark.slow
def test_timeout_and_full_queue_on_llamacpp(server):
    api.test_timeout_gives_504_and_full_queue_gives_503(server)


@pytest.mark.slow
def test_admin_loads_an_adapter_as_its_own_gguf(server):
    # Loading an adapter on llama.cpp merges it into its backbone and converts the result (seconds, not the
    # transformers engine's instant attach): the client waits longer than httpx's default 5 s.
    admin = {"Authorization": f"Bearer {server.keys['admin']}"}
    c = client(server)
    r = httpx.post(
        server.url + "/admin/models",
        headers=admin,
        json={"name": "med-b", "source": str(server.root / "adapter-b")},
        timeout=300,
    )
    assert r.status_code == 201, r.text
    b = chat(c, model="med-b", max_tokens=10, temperature=0).choices[0].message.content
    a = chat(c, model="med-a", max_tokens=10, temperature=0).choices[0].message.content
    assert a != b
    assert httpx.delete(server.url + "/admin/models/med-b", headers=admin).json()["deleted"] is True
    assert chat(c, model="med-a", max_tokens=10, temperature=0).choices[0].message.content == a
