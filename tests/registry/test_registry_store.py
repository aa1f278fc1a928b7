"""Model registry on a real SQLite file: versions, checksums, aliases, concurrency, run registration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.registry import ModelRegistry, register_run, registry_from_config

VERSION_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)_([0-9a-f]{8}|nodata)_\d{8}T\d{6}Z$")


@pytest.fixture()
def artefact(tmp_path) -> Path:
    folder = tmp_path / "src" / "model"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}), encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    return folder


@pytest.fixture()
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(f"sqlite:///{tmp_path / 'reg' / 'registry.db'}")


def test_register_names_versions_and_bumps(registry, artefact):
    v1 = registry.register("med", artifacts={"model": artefact}, data_hash="0123456789abcdef")
    v2 = registry.register("med", artifacts={"model": artefact}, data_hash="0123456789abcdef", bump="minor")
    v3 = registry.register("med", artifacts={"model": artefact}, data_hash="fedcba9876543210")
    v4 = registry.register("med", artifacts={"model": artefact}, data_hash="fedcba9876543210", bump="major")
    semvers = [VERSION_RE.match(v).groups()[:3] for v in (v1, v2, v3, v4)]
    assert semvers == [("0", "0", "1"), ("0", "1", "0"), ("0", "1", "1"), ("1", "0", "0")]
    assert VERSION_RE.match(v1).group(4) == "01234567" and VERSION_RE.match(v3).group(4) == "fedcba98"
    assert [r["version"] for r in registry.list("med")] == [v1, v2, v3, v4]
    with pytest.raises(UserError, match="bump"):
        registry.register("med", artifacts={"model": artefact}, bump="huge")
    info = registry.show("med", "v0.1.0")
    assert info["version"] == v2
    assert {f["path"] for f in info["artifacts"]} == {"model/adapter_config.json", "model/adapter_model.safetensors"}
    assert registry.show("med", "latest")["version"] == v4


def test_resolve_verifies_checksums_and_refuses_tampering(registry, artefact):
    version = registry.register("med", artifacts={"model": artefact})
    registry.promote("med", version, alias="production")
    folder = registry.resolve("registry://med@production")
    assert folder.name == "model" and (folder / "adapter_config.json").is_file()
    assert registry.resolve(f"registry://med@{version}") == folder
    assert registry.version_of("registry://med@production") == version

    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"tampered.*adapter_model\.safetensors: sha256 mismatch"):
        registry.resolve("registry://med@production")
    assert registry.verify("med", version) == [
        "model/adapter_model.safetensors: sha256 mismatch (file changed after registration)"
    ]
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    registry.resolve("registry://med@production")  # restored: accepted again
    (folder / "extra.py").write_text("print('injected')")
    with pytest.raises(UserError, match=r"extra\.py: not part of the registered version"):
        registry.resolve("registry://med@production")


def test_bad_uris_and_unknown_versions_are_clear_errors(registry, artefact):
    registry.register("med", artifacts={"model": artefact})
    with pytest.raises(UserError, match="registry://name@alias"):
        registry.resolve("registry://med")
    with pytest.raises(UserError, match="no such version or alias"):
        registry.resolve("registry://med@production")
    with pytest.raises(UserError, match="no model named"):
        registry.resolve("registry://other@v0.0.1")


def test_promote_rollback_keeps_alias_history(registry, artefact):
    v1, v2, v3 = (registry.register("med", artifacts={"model": artefact}) for _ in range(3))
    registry.promote("med", v1, alias="production")
    registry.promote("med", v2, alias="production")
    registry.promote("med", v3, alias="production")
    registry.promote("med", v3, alias="candidate")
    assert registry.aliases("med") == {"production": v3, "candidate": v3}
    assert registry.rollback("med", "production") == (v3, v2)
    assert registry.rollback("med", "production") == (v2, v1)
    with pytest.raises(UserError, match="no previous holder"):
        registry.rollback("med", "production")
    assert registry.aliases("med") == {"production": v1, "candidate": v3}  # other aliases untouched
    history = registry.alias_history("med", "production")
    assert [(h["action"], h["previous"], h["version"]) for h in history] == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("promote", v2, v3),
        ("rollback", v3, v2),
        ("rollback", v2, v1),
    ]
    registry.promote("med", v3, alias="production")
    assert registry.rollback("med", "production") == (v3, v1)  # back to the holder before v3, not v2


def test_status_archive_and_rejected_versions(registry, artefact):
    good = registry.register("med", artifacts={"model": artefact}, status="candidate")
    bad = registry.register("med", artifacts={"model": artefact}, status="rejected", reasons=["tuned.rougeL < 0.2"])
    assert registry.show("med", bad)["reasons"] == ["tuned.rougeL < 0.2"]
    with pytest.raises(UserError, match=r"rejected \(tuned.rougeL < 0.2\)"):
        registry.promote("med", bad, alias="production")
    registry.promote("med", good, alias="production")
    with pytest.raises(UserError, match="still holds alias"):
        registry.archive("med", good)
    registry.archive("med", bad, reason="superseded")
    assert registry.show("med", bad)["status"] == "archived"
    registry.record_event("med", good, "canary_rollback", {"candidate_error_rate": 0.31, "window": 200})
    kinds = [e["kind"] for e in registry.events("med", good)]
    assert kinds == ["registered", "promoted", "canary_rollback"]  # promotions are events too
    assert registry.show("med", good)["events"][-1]["details"]["window"] == 200


def test_diff_reports_config_and_metric_changes(registry, artefact):
    a = registry.register(
        "med",
        artifacts={"model": artefact},
        metadata={"config": {"train": {"lr": 2e-4, "r": 8}}, "metrics": {"eval": {"rougeL": 0.30}}, "base_model": "x"},
    )
    b = registry.register(
        "med",
        artifacts={"model": artefact},
        metadata={"config": {"train": {"lr": 1e-4, "r": 8}}, "metrics": {"eval": {"rougeL": 0.35}}, "base_model": "x"},
    )
    diff = registry.diff("med", a, b)
    assert diff["config"] == {"train.lr": {"a": 2e-4, "b": 1e-4}}
    assert diff["metrics"]["eval.rougeL"]["delta"] == pytest.approx(0.05)
    assert diff["base_model"] == {}


def test_interrupted_register_leaves_no_half_registered_version(registry, artefact, tmp_path):
    class NotJson:
        pass

    import subprocess

    from sqlalchemy.exc import StatementError

    with pytest.raises(StatementError):  # the metadata cannot be stored, after the artefacts were copied in
        registry.register("med", artifacts={"model": artefact}, metadata={"x": NotJson()})
    gone = subprocess.Popen(["true"])
    gone.wait()
    (registry.store / "med" / f".staging-{gone.pid}-0123abcd" / "model").mkdir(parents=True)  # a killed register
    assert registry.list() == []
    leftovers = list((registry.store / "med").iterdir()) if (registry.store / "med").exists() else []
    assert [p.name for p in leftovers] == [f".staging-{gone.pid}-0123abcd"]
    version = registry.register("med", artifacts={"model": artefact})
    assert version.startswith("v0.0.1_")
    assert [p.name for p in (registry.store / "med").iterdir()] == [version]  # the killed one's copy is cleared


WORKER = textwrap.dedent("""
    import sys, time
    from domaintune.registry import ModelRegistry
    url, source, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    registry = ModelRegistry(url)
    time.sleep(max(0.0, start_at - time.time()))
    print(registry.register("med", artifacts={"model": source}, data_hash="abcdef0123456789"))
""")


def test_concurrent_registration_from_separate_processes(tmp_path, artefact):
    url = f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
    ModelRegistry(url)  # create the schema once, as a deployed registry would have it
    start_at = time.time() + 4.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(artefact), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-2000:] for _, err in results]
    versions = sorted(out.strip().splitlines()[-1] for out, _ in results)
    assert len(set(versions)) == 4
    assert sorted(VERSION_RE.match(v).groups()[2] for v in versions) == ["1", "2", "3", "4"]
    registry = ModelRegistry(url)
    assert sorted(r["version"] for r in registry.list("med")) == versions
    for version in versions:
        assert registry.verify("med", version) == []
    assert sorted(p.name for p in (registry.store / "med").iterdir()) == versions


# ---------------------------------------------------------------- register_run


def _run_folder(tmp_path: Path, artefact: Path, gates: dict | None) -> Path:
    import shutil

    run = tmp_path / "runs" / "med"
    shutil.copytree(artefact, run / "model")
    (run / "data").mkdir(parents=True)
    for split, n in (("train", 5), ("val", 2), ("test", 2)):
        rows = [
            {
                "id": f"{split}{i}",
                "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            }
            for i in range(n)
        ]
        (run / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "train").mkdir()
    (run / "train" / "metrics.json").write_text(
        json.dumps({"method": "lora", "final_val_loss": 1.25, "config": {"method": "lora", "learning_rate": 2e-4}})
    )
    if gates is not None:
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(
            json.dumps({"metrics": {"test": {"tuned": {"rougeL": 0.4}}}, "gates": gates})
        )
    return run


def test_register_run_gathers_lineage_and_status(tmp_path, artefact):
    run = _run_folder(tmp_path, artefact, {"passed": False, "failures": ["test.tuned.rougeL 0.4 < 0.5"]})
    cfg = config_from_dict({"name": "med", "output_dir": str(run)})
    v1 = register_run(cfg, RunLayout(run))
    registry = registry_from_config(cfg)
    assert Path(registry.store).parent == tmp_path / "runs" / "registry"  # beside the run folder
    info = registry.show("med", v1)
    assert info["status"] == "rejected" and info["reasons"] == ["test.tuned.rougeL 0.4 < 0.5"]
    meta = info["metadata"]
    assert meta["data"]["rows"] == {"train": 5, "val": 2, "test": 2}
    assert meta["method"] == "lora" and meta["hyperparameters"]["learning_rate"] == 2e-4
    assert meta["metrics"]["eval"]["test"]["tuned"]["rougeL"] == 0.4
    assert meta["metrics"]["train"]["final_val_loss"] == 1.25
    assert meta["lineage"]["eval_run"]["report_sha256"] and meta["lineage"]["parent_version"] is None
    assert {"torch", "transformers", "sqlalchemy"} <= set(meta["libraries"])
    assert VERSION_RE.match(v1).group(4) == meta["data"]["fingerprint"][:8]

    (run / "eval" / "report.json").write_text(json.dumps({"metrics": {}, "gates": {"passed": True, "failures": []}}))
    v2 = register_run(cfg, RunLayout(run), bump="minor")
    info2 = registry.show("med", v2)
    # lineage follows weights: a second run from the base model is not the (rejected) v1's child ...
    assert info2["status"] == "candidate" and info2["parent"] is None
    # ... while one that started from a registered version is
    child_cfg = config_from_dict(
        {"name": "med", "output_dir": str(run), "train": {"init_from": "registry://med@" + v2}}
    )
    v3 = register_run(child_cfg, RunLayout(run))
    assert registry.show("med", v3)["parent"] == v2
    assert registry.show("med", v3)["metadata"]["lineage"]["parent_version"] == v2
    assert registry.resolve("registry://med@" + v2.split("_")[0]).name == "model"


def test_register_run_refuses_an_export_that_differs_from_its_manifest(tmp_path, artefact):
    run = _run_folder(tmp_path, artefact, None)
    (run / "export").mkdir()
    (run / "export" / "note.txt").write_text("original")
    from domaintune.export.runner import file_checksums

    (run / "export" / "manifest.json").write_text(json.dumps({"files": file_checksums(run / "export")}))
    (run / "export" / "note.txt").write_text("changed")
    cfg = config_from_dict({"name": "med", "output_dir": str(run)})
    with pytest.raises(UserError, match=r"note\.txt: sha256 mismatch"):
        register_run(cfg, RunLayout(run))
    assert registry_from_config(cfg).list() == []


def test_register_run_records_the_out_of_source_holdout(tmp_path, artefact):
    """data/holdout_<name>.jsonl (data.split.holdout_group) is recorded by sha256 like the splits, so the version
    says which out-of-source rows its eval report scored (fingerprint of the training data unchanged)."""
    run = _run_folder(tmp_path, artefact, {"passed": True, "failures": []})
    cfg = config_from_dict({"name": "med", "output_dir": str(run)})
    before = register_run(cfg, RunLayout(run))
    row = {"id": "h0", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (run / "data" / "holdout_out_of_source.jsonl").write_text(json.dumps(row) + "\n")
    after = register_run(cfg, RunLayout(run), bump="minor")
    registry = registry_from_config(cfg)
    data = registry.show("med", after)["metadata"]["data"]
    assert data["rows"]["holdout_out_of_source"] == 1 and "holdout_out_of_source.jsonl" in data["files"]
    assert data["fingerprint"] == registry.show("med", before)["metadata"]["data"]["fingerprint"]
