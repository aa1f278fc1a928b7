"""bench/gpu_proof.py: on a CPU machine the proof still plans every step, writes and validates its configs and
reports what is missing, instead of crashing (the GPU run itself needs a CUDA machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ["lora_bf16", "lora_second", "qlora", "full", "ddp", "fsdp", "vllm_serve", "export_bnb", "bench_train"]


def _proof(monkeypatch):
    # main() puts src/ on sys.path and PYTHONPATH for its steps: undone after each test
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    spec = importlib.util.spec_from_file_location("gpu_proof", REPO / "bench" / "gpu_proof.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_proof"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_every_step_and_reports_what_is_missing(tmp_path, monkeypatch):
    proof = _proof(monkeypatch)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "openai-0.0.0-py3-none-any.whl").write_bytes(b"")
    assert proof.main(["--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(wheels)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == STEPS
    assert {s["status"] for s in report["steps"]} == {"dry-run"}
    assert report["wheels"]["wheels"] == ["openai-0.0.0-py3-none-any.whl"]  # listed, not installed in a dry run
    by_name = {s["name"]: s["detail"] for s in report["steps"]}
    for name in ("lora_bf16", "lora_second", "full", "ddp", "fsdp", "vllm_serve", "export_bnb"):
        assert by_name[name]["config"] == "valid", (name, by_name[name])
    assert (tmp_path / "out" / "lora_bf16" / "data" / "train.jsonl").is_file()
    missing = [m for m, ok in report["environment"]["packages"].items() if not ok]
    if "vllm" in missing:
        assert "vllm" in by_name["vllm_serve"]["missing"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| vllm_serve | dry-run |" in markdown and "missing packages:" in markdown


def test_without_cuda_a_real_run_skips_every_step_and_says_so(tmp_path, monkeypatch):
    proof = _proof(monkeypatch)
    monkeypatch.setattr(proof, "environment", lambda: {"packages": {"torch": True}, "cuda": False})
    assert proof.main(["--out", str(tmp_path), "--budget-s", "5"]) == 1
    statuses = {s["status"] for s in json.loads((tmp_path / "report.json").read_text())["steps"]}
    assert statuses == {"skipped: no CUDA device"}


def test_the_shell_entry_point_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_proof.sh")]).returncode == 0
