"""The stage contract: fingerprints follow each stage's declared reads, and undeclared reads are refused."""

from __future__ import annotations

from typing import Any

import pytest

from domaintune.config import config_from_dict
from domaintune.layout import RunLayout
from domaintune.utils.io import write_json
from domaintune.workflow.pipeline import STAGE_ORDER, STAGES, run_pipeline
from domaintune.workflow.stage import ScopedConfig, StageSpec, UndeclaredConfigReadError


def _config(tmp_path, **sections: Any):
    data = {"name": "contract", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "tiny-random-llama"}}
    data.update(sections)
    return config_from_dict(data)


def _recording_runners(calls: list[str], reads: dict[str, list[str]] | None = None):
    """Stand-in stages that write their declared outputs and read only what the test says."""

    def make(name: str):
        def runner(cfg, layout: RunLayout, ctx: dict[str, Any]) -> dict[str, Any]:
            calls.append(name)
            for section in (reads or {}).get(name, []):
                getattr(cfg, section)
            for path in STAGES[name].output_paths(layout):
                if path.suffix:
                    write_json(path, {"stage": name, "version": "v0.0.1"})
                else:
                    path.mkdir(parents=True, exist_ok=True)
            return {"stage": name}

        return runner

    return {name: make(name) for name in STAGE_ORDER}


def test_changing_the_eval_metric_reruns_export(tmp_path):
    """Export reads eval.primary_metric (to pick what it measures); changing it must re-run export."""
    calls: list[str] = []
    runners = _recording_runners(calls, reads={"export": ["export", "eval"]})
    run_pipeline(_config(tmp_path), runners=runners)
    assert calls == STAGE_ORDER
    calls.clear()
    run_pipeline(_config(tmp_path), runners=runners)
    assert calls == [], "nothing changed, nothing re-runs"
    run_pipeline(_config(tmp_path, eval={"primary_metric": "bleu"}), runners=runners)
    assert "export" in calls and "eval" in calls
    # train reads it too (train.generation_eval's default metric, train/generation_eval.py); data does not
    assert "train" in calls and "data" not in calls


def test_changing_serve_settings_reruns_nothing(tmp_path):
    calls: list[str] = []
    runners = _recording_runners(calls)
    run_pipeline(_config(tmp_path), runners=runners)
    calls.clear()
    run_pipeline(_config(tmp_path, serve={"port": 9001}), runners=runners)
    assert calls == []


def test_a_stage_reading_an_undeclared_section_fails_loudly(tmp_path):
    calls: list[str] = []
    runners = _recording_runners(calls, reads={"export": ["serve"]})
    with pytest.raises(UndeclaredConfigReadError, match=r"stage 'export' read cfg\.serve"):
        run_pipeline(_config(tmp_path), runners=runners)
    state = RunLayout(tmp_path / "run").state_file.read_text()
    assert '"failed"' in state


def test_scoped_config_passes_shared_fields_and_declared_sections(tmp_path):
    cfg = _config(tmp_path)
    view = ScopedConfig(cfg, StageSpec("x", ("train",), (), ()))
    assert view.name == "contract" and view.seed == cfg.seed and view.layout == cfg.layout
    assert view.train is cfg.train
    with pytest.raises(UndeclaredConfigReadError):
        _ = view.data
    with pytest.raises(AttributeError):
        view.name = "other"


def test_declared_reads_are_known_sections():
    with pytest.raises(ValueError, match="unknown config section"):
        StageSpec("x", ("nonsense",), (), ())
    for spec in STAGES.values():
        assert spec.reads, spec.name
        assert all(hasattr(RunLayout, attr) for attr in spec.outputs), spec.name


def test_a_single_declared_field_is_readable_and_fingerprinted_alone(tmp_path):
    """Train reads serve.feedback_dir (DPO's default data) but no other serve setting."""
    spec = StageSpec("t", ("train", "serve.feedback_dir"), (), ())
    cfg = _config(tmp_path, serve={"feedback_dir": str(tmp_path / "fb")})
    view = ScopedConfig(cfg, spec)
    assert view.serve.feedback_dir == cfg.serve.feedback_dir
    with pytest.raises(UndeclaredConfigReadError, match=r"cfg\.serve\.port"):
        _ = view.serve.port
    assert spec.read_values(cfg)["serve.feedback_dir"] == str(tmp_path / "fb")
    calls: list[str] = []
    runners = _recording_runners(calls)
    run_pipeline(_config(tmp_path), runners=runners)
    calls.clear()
    run_pipeline(_config(tmp_path, serve={"feedback_dir": str(tmp_path / "elsewhere")}), runners=runners)
    assert calls[:1] == ["train"], "a new feedback folder re-trains (DPO reads it)"
