"""Config errors of the train stage: each names the field and says what to do."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.config import ConfigError, config_from_dict
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.train.runner import run_train
from train_helpers import make_run_dir, tiny_config


def _cfg(**train):
    return config_from_dict({"name": "t", "model": {"name_or_path": "tiny-random-llama"}, "train": train})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_qlora_without_cuda_fails_at_config_time():
    with pytest.raises(ConfigError, match=r"train: .*qlora.*CUDA GPU.*use `lora`"):
        _cfg(method="qlora")
    with pytest.raises(ConfigError, match="CUDA"):
        _cfg(method="dpo", dpo={"adapter": "qlora"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_fp16_needs_a_gpu():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        _cfg(precision="fp16")


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"method": "sgd"}, r"train.method: Input should be 'full'"),
        ({"lora": {"rank": 8}}, r"train.lora.rank: unknown key"),
        ({"method": "distill"}, "needs a `train.distill:` section"),
        ({"method": "prompt", "packing": True}, "packing cannot be used with `prompt`"),
        ({"eval_steps": 20, "save_steps": 30}, "must be a multiple of eval_steps"),
        ({"lr_scheduler": "step"}, r"train.lr_scheduler"),
        ({"replay": {"ratio": 1.5}}, r"train.replay.ratio"),
    ],
)
def test_invalid_settings_name_the_field(train, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**train)


def test_unknown_target_module_lists_valid_names(tmp_path):
    run = make_run_dir(tmp_path)
    with pytest.raises(
        UserError, match=r"train.lora.target_modules: unknown module name\(s\) \['qproj'\]; valid names: .*'q_proj'"
    ):
        run_train(tiny_config(lora={"target_modules": ["qproj", "v_proj"]}), RunLayout(run))
    with pytest.raises(UserError, match=r"train.freeze.modules: unknown module name\(s\) \['attn'\]"):
        run_train(tiny_config(method="freeze", freeze={"modules": ["attn"]}), RunLayout(run))


def test_named_target_modules_are_the_only_adapted_ones(tmp_path):
    import json

    run = make_run_dir(tmp_path)
    run_train(tiny_config(lora={"target_modules": ["q_proj", "v_proj"]}), RunLayout(run))
    assert sorted(json.loads((run / "model" / "adapter_config.json").read_text())["target_modules"]) == [
        "q_proj",
        "v_proj",
    ]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_mlflow_tracking_without_mlflow_is_a_clear_error(tmp_path):
    run = make_run_dir(tmp_path)
    with pytest.raises(UserError, match=r"mlflow is not installed: pip install"):
        run_train(tiny_config(tracking="mlflow"), RunLayout(run))


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="mlflow not installed (pip install 'domaintune[tracking]')"
)
def test_mlflow_tracking_logs_the_run(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny-mlflow")
    run = make_run_dir(tmp_path)
    metrics = run_train(tiny_config(tracking="mlflow", max_steps=4, logging_steps=1), RunLayout(run))
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]  # one point per logging step
    assert losses[-1].value == pytest.approx(metrics["final_train_loss"], rel=1e-4)
    assert runs[0].data.params["learning_rate"]  # the Trainer's arguments are logged as params
    assert (run / "train" / "tensorboard").is_dir()  # TensorBoard keeps logging beside MLflow
    assert not (run / "train" / "mlflow.db").exists()  # the configured server (here a file) got the run

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # no server configured: a store inside the run folder
    run2 = make_run_dir(tmp_path / "second")
    run_train(tiny_config(tracking="mlflow", max_steps=2), RunLayout(run2))
    local = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run2 / 'train' / 'mlflow.db'}")
    assert len(local.search_runs([local.get_experiment_by_name("tiny-mlflow").experiment_id])) == 1


def test_missing_data_points_at_the_data_stage(tmp_path):
    with pytest.raises(UserError, match=r"train.jsonl: not found \(run `domaintune data"):
        run_train(tiny_config(), RunLayout(tmp_path))


def test_cli_help_and_set_overrides(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--resume" in result.output
    run = make_run_dir(tmp_path / "run")
    config = tmp_path / "c.yaml"
    config.write_text("name: t\nmodel: {name_or_path: tiny-random-llama}\ntrain: {max_length: 64, tracking: none}\n")
    result = runner.invoke(
        app,
        [
            "train",
            str(config),
            "--output-dir",
            str(run),
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_steps=2",
            "--set",
            "train.save_steps=2",
            "--set",
            "train.max_val_samples=4",
            "--set",
            "train.method=ia3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run / "model" / "adapter_config.json").is_file()
    result = runner.invoke(app, ["train", str(config), "--output-dir", str(run), "--set", "train.method=qlora"])
    if not torch.cuda.is_available():
        assert result.exit_code == 2 and "CUDA" in result.output
