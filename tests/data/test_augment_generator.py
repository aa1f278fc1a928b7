"""Generator-backed augmentation: the tiny model locally and through the project's own OpenAI-compatible
server on loopback (official `openai` client); batching, the on-disk cache, and failures in quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.augment.config import GeneratorConfig
from domaintune.data.augment.generator import CachedGenerator, GenerationError, LocalGenerator
from domaintune.data.pipeline import run_data
from domaintune.layout import RunLayout
from domaintune.model.config import ModelConfig
from serve_helpers import serve_config

LONG = (
    "Insulin therapy is adjusted to the measured blood glucose, the meals and the exercise of the day. " * 14
).strip()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def docs() -> list[dict]:
    rows = [
        {
            "q": f"What about treatment plan {i} for condition {i * 3}?",
            "a": f"Treatment plan {i} for condition {i * 3} starts with {i + 1} mg daily. "
            f"Doctors review plan {i} after {i + 2} weeks and change the dose when needed.",
        }
        for i in range(7)
    ]
    rows.append({"q": "How is insulin therapy adjusted?", "a": LONG})
    return rows


def cfg_for(tmp: Path, generator: dict, ops: list[dict]):
    write_jsonl(tmp / "in.jsonl", docs())
    data = {
        "sources": [{"name": "docs", "path": "in.jsonl", "fields": {"instruction": "q", "output": "a"}}],
        "split": {"ratios": [1, 0, 0]},
        "filters": {"outlier_sigma": None, "max_repetition": None},
        "augment": {"generator": generator, "ops": ops},
    }
    return config_from_dict(
        {"name": "t", "model": {"name_or_path": "tiny-random-llama"}, "data": data}, config_path=tmp / "p.yaml"
    )


QA = {"op": "synthetic_qa", "passage_chars": 1500, "min_passage_chars": 50}


def test_local_batched_generation_matches_one_by_one(tiny_model_dir):
    gen = LocalGenerator(GeneratorConfig(max_new_tokens=8), ModelConfig(name_or_path="tiny-random-llama"))
    items = [[{"role": "user", "content": t}] for t in ("hi", "a much longer prompt with many more words in it", "ok?")]
    batched = gen.generate(items)
    assert all(isinstance(t, str) for t in batched)
    assert batched == [gen.generate([m])[0] for m in items]  # left padding does not change the answers


def test_tiny_model_cache_hit_on_rerun_and_failure_quarantined(tmp_path, tiny_model_dir):
    gen = {"kind": "local", "max_new_tokens": 12, "batch_size": 4, "max_input_tokens": 200}
    ops = [QA, {"op": "paraphrase", "n": 2, "max_rows": 3}, {"op": "back_translate", "max_rows": 2}]
    cfg = cfg_for(tmp_path, gen, ops)
    rep1 = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)["augment"]
    qa, para, bt = rep1["ops"]
    assert qa["passages"] == 8
    # the long passage's prompt exceeds max_input_tokens: that item fails and is quarantined; the rest go on
    assert qa["generator"] == {"cache_hits": 0, "generated": 7, "failed": 1} and qa["failed"] == 1
    assert qa["created"] + sum(qa["rejected"].values()) == 7
    assert para["generator"]["generated"] == 3 and bt["generator"]["generated"] >= 2
    q = read(tmp_path / "run/data/quarantine.jsonl")
    failed = [e for e in q if e["reason"].startswith("generator failed")]
    assert (
        len(failed) == 1 and failed[0]["stage"] == "augment/synthetic_qa" and "max_input_tokens" in failed[0]["reason"]
    )
    assert failed[0]["loc"] == "docs-000008"
    assert len(q) == rep1["quarantined"]
    cache = tmp_path / "run/data/augment_cache/generations.jsonl"
    n_cached = len(cache.read_text().splitlines())
    train1 = (tmp_path / "run/data/train.jsonl").read_text()
    # re-run: everything that succeeded comes from the cache; only the failed item is tried again
    rep2 = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)["augment"]
    for op in rep2["ops"]:
        assert op["generator"]["generated"] == 0
    assert rep2["ops"][0]["generator"] == {"cache_hits": 7, "generated": 0, "failed": 1}
    assert (tmp_path / "run/data/train.jsonl").read_text() == train1
    assert len(cache.read_text().splitlines()) == n_cached
    # a changed setting is a different input hash: regenerated
    cfg3 = cfg_for(tmp_path, {**gen, "max_new_tokens": 6}, [QA])
    rep3 = run_data(cfg3, RunLayout(tmp_path / "run"), progress=False)["augment"]
    assert rep3["ops"][0]["generator"]["generated"] == 7


def test_cache_is_resumable_after_an_interruption(tmp_path, tiny_model_dir):
    gcfg = GeneratorConfig(max_new_tokens=4, batch_size=2)
    items = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]

    class Interrupted(LocalGenerator):
        calls = 0

        def generate(self, batch):
            Interrupted.calls += 1
            if Interrupted.calls == 2:
                raise KeyboardInterrupt  # the run dies in the middle of the second batch
            return super().generate(batch)

    first = CachedGenerator(Interrupted(gcfg, ModelConfig(name_or_path="tiny-random-llama")), gcfg, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        first.generate(items)
    again = CachedGenerator(LocalGenerator(gcfg, ModelConfig(name_or_path="tiny-random-llama")), gcfg, tmp_path)
    out = again.generate(items)
    assert again.hits == 2 and again.generated == 3 and all(isinstance(t, str) for t in out)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.app import build_state
    from domaintune.serve.server import BackgroundServer

    root = tmp_path_factory.mktemp("augment_serve")
    state = build_state(serve_config(root / "run"))
    key = state.store.create_key("augment")[1]
    with BackgroundServer(state) as srv:
        srv.key = key
        yield srv


def test_openai_compatible_endpoint_on_loopback(tmp_path, server, monkeypatch):
    monkeypatch.setenv("DT_AUGMENT_KEY", server.key)
    gen = {
        "kind": "openai",
        "base_url": server.url + "/v1",
        "model": "tiny-random-llama",
        "api_key_env": "DT_AUGMENT_KEY",
        "max_new_tokens": 12,
        "batch_size": 4,
    }
    ops = [QA, {"op": "back_translate", "max_rows": 3, "translator": gen}]
    cfg = cfg_for(tmp_path, gen, ops)
    rep = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)["augment"]
    qa, bt = rep["ops"]
    # the long passage exceeds the server's 256-token context: a 400 for that item only
    assert qa["generator"] == {"cache_hits": 0, "generated": 7, "failed": 1}
    q = read(tmp_path / "run/data/quarantine.jsonl")
    failed = [e for e in q if e["reason"].startswith("generator failed")]
    assert len(failed) == 1 and "BadRequestError" in failed[0]["reason"] and failed[0]["loc"] == "docs-000008"
    assert bt["generator"]["generated"] >= 3
    rep2 = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)["augment"]
    assert rep2["ops"][0]["generator"] == {"cache_hits": 7, "generated": 0, "failed": 1}


def test_missing_api_key_env_is_a_clear_error(tmp_path, monkeypatch):
    from domaintune.errors import UserError

    monkeypatch.delenv("DT_NO_SUCH_KEY", raising=False)
    gen = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "DT_NO_SUCH_KEY"}
    with pytest.raises(UserError, match="DT_NO_SUCH_KEY is not set"):
        run_data(cfg_for(tmp_path, gen, [QA]), RunLayout(tmp_path / "run"), progress=False)
    assert GenerationError("x").args == ("x",)


def test_example_yaml_loads():
    from domaintune.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "augment-en.yaml")
    (op,) = cfg.data.augment.ops
    assert op.op == "synthetic_qa" and op.max_passages == 50 and cfg.data.augment.generator.kind == "local"


@pytest.mark.slow
def test_bundled_model_paraphrases_and_back_translates(tmp_path):
    """SmolLM2-135M writes real paraphrases: the accepted rows keep the answer and point at their source."""
    rows = [
        {"q": "What are the symptoms of type 2 diabetes?", "a": "Thirst, frequent urination and tiredness."},
        {"q": "How can I lower my blood pressure?", "a": "Less salt, more exercise and prescribed medicine."},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = {
        "sources": [{"name": "qa", "path": "in.jsonl", "fields": {"instruction": "q", "output": "a"}}],
        "split": {"ratios": [1, 0, 0]},
        "filters": {"outlier_sigma": None},
        "dedup": {"near": False},
        "augment": {"generator": {"max_new_tokens": 48}, "ops": [{"op": "paraphrase", "n": 2}]},
    }
    cfg = config_from_dict({"name": "t", "data": data}, config_path=tmp_path / "p.yaml")
    rep = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)["augment"]["ops"][0]
    train = read(tmp_path / "run/data/train.jsonl")
    syn = [r for r in train if r.get("origin") == "synthetic/paraphrase"]
    assert rep["created"] == len(syn) >= 1
    by_id = {r["id"]: r for r in train if "origin" not in r}
    for r in syn:
        src = by_id[r["derived_from"][0]]
        assert r["messages"][-1] == src["messages"][-1] and r["messages"][0]["content"] != src["messages"][0]["content"]
