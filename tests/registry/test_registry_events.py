"""Decisions are visible: promotions, rollbacks, canary decisions and rounds are events `registry list/show` print."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.registry.store import ModelRegistry

runner = CliRunner()


def _registry(tmp_path: Path) -> tuple[ModelRegistry, list[str]]:
    model = tmp_path / "src" / "model"
    model.mkdir(parents=True)
    (model / "adapter_config.json").write_text('{"r": 4}')
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'registry.db'}", store=tmp_path / "artifacts")
    v1 = registry.register("med", artifacts={"model": model}, status="candidate")
    v2 = registry.register(
        "med", artifacts={"model": model}, status="candidate", parent=v1, metadata={"round": {"fingerprint": "abc"}}
    )
    return registry, [v1, v2]


def test_promotions_rollbacks_and_canary_decisions_are_listed(tmp_path):
    registry, (v1, v2) = _registry(tmp_path)
    registry.promote("med", v1, alias="production")
    registry.promote("med", v2, alias="production", note="canary promoted")
    registry.rollback("med", "production", note="too many complaints")
    registry.record_event("med", v2, "canary_rolled_back", {"reason": "candidate negative feedback rate 40% vs 0%"})
    registry.record_event("med", v2, "round", {"parent": v1, "feedback_rows": 7})
    rows = {r["version"]: r for r in registry.list("med")}
    assert [e["kind"] for e in rows[v1]["events"]] == ["registered", "promoted"]
    kinds = [e["kind"] for e in rows[v2]["events"]]
    assert kinds == ["registered", "promoted", "rolled_back", "canary_rolled_back", "round"]
    rolled = rows[v2]["events"][2]["details"]
    assert rolled == {"alias": "production", "to": v1, "note": "too many complaints"}

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    listed = runner.invoke(app, ["registry", "list", "--url", url])
    assert listed.exit_code == 0, listed.output
    lines = [" ".join(line.split()) for line in listed.output.splitlines()]  # events: one line each, any width
    assert any("med@v0.0.2 rolled back from production to v0.0.1" in line for line in lines), listed.output
    assert any("med@v0.0.2 canary rolled back: candidate negative feedback rate 40% vs 0%" in line for line in lines)
    assert any("med@v0.0.2 round from v0.0.1: 7 feedback rows" in line for line in lines)
    shown = runner.invoke(app, ["registry", "show", v2, "--url", url])
    assert any(
        "canary rolled back: candidate negative feedback rate 40%" in " ".join(line.split())
        for line in shown.output.splitlines()
    )
    as_json = json.loads(runner.invoke(app, ["registry", "list", "--url", url, "--json"]).stdout)
    assert as_json[1]["parent"] == v1 and as_json[1]["events"][-1]["kind"] == "round"


def test_find_by_metadata(tmp_path):
    registry, (_v1, v2) = _registry(tmp_path)
    assert [r["version"] for r in registry.find_by_metadata("med", "round.fingerprint", "abc")] == [v2]
    assert registry.find_by_metadata("med", "round.fingerprint", "other") == []
