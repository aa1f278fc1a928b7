"""`domaintune train --nproc 2` on CPU with gloo: DDP and FSDP match one process, resume, failing rank, DeepSpeed config.

Every multi-process test runs the real CLI in a subprocess (torchrun starts 2 workers, 1 torch thread each)
on the tiny model; losses are compared with a single-process run on the same global batch and seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domaintune.config import load_config
from domaintune.errors import UserError
from domaintune.train import distributed as dist
from domaintune.train.config import TrainConfig
from domaintune.train.runner import run_train
from train_helpers import make_run_dir, one_line

DOMAINTUNE = [sys.executable, "-m", "domaintune"]
# lora dropout 0 and fp32: the only randomness left is the data order, which N processes share.
BASE_TRAIN = {
    "max_steps": 6,
    "eval_steps": 2,
    "save_steps": 2,
    "save_total_limit": 4,
    "batch_size": 4,
    "max_length": 64,
    "learning_rate": 1e-3,
    "max_val_samples": 8,
    "logging_steps": 1,
    "tracking": "tensorboard",
    "num_threads": 1,
    "precision": "fp32",  # 1 process vs N compared to 1e-5: the same arithmetic on every CPU
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "lora": {"dropout": 0.0},
}


def _config(tmp_path: Path, name: str, **train) -> Path:
    run = make_run_dir(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    cfg = {
        "name": name,
        "output_dir": str(run),
        "model": {"name_or_path": "tiny-random-llama"},
        "train": {**BASE_TRAIN, **train},
    }
    path.write_text(json.dumps(cfg))  # JSON is valid YAML
    return path


def _single(config_path: Path, *overrides: str) -> dict:
    cfg = load_config(config_path, ["train.distributed=none", *overrides], config_path.parent / "single")
    make_run_dir(cfg.output_dir)
    return run_train(cfg, cfg.layout)


def _cli(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    # The child's console width is set here, not inherited from the terminal running the tests: rich wraps its
    # tables and messages at COLUMNS, and a wrapped table row cannot be found as one phrase.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400", **(env or {})}
    return subprocess.run([*DOMAINTUNE, "train", *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def _metrics(config_path: Path) -> dict:
    run = Path(json.loads(config_path.read_text())["output_dir"])
    return json.loads((run / "train" / "metrics.json").read_text())


def _assert_curves_match(got: dict, want: dict, rel: float = 1e-4) -> None:
    assert [s for s, _ in got["train_curve"]] == [s for s, _ in want["train_curve"]]
    for (step, a), (_, b) in zip(got["train_curve"], want["train_curve"]):
        assert a == pytest.approx(b, rel=rel), f"train loss at step {step}: {a} vs {b}"
    assert got["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=rel)


def _two_processes_match_one(config: Path, strategy: str) -> tuple[dict, Path]:
    """Train with 1 process, then `--nproc 2`; assert the strategy that ran and equal curves.

    Returns the one-process metrics and the 2-process run folder."""
    single = _single(config)
    result = _cli(str(config), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(config)
    assert metrics["distributed"]["strategy"] == strategy and metrics["distributed"]["world_size"] == 2
    _assert_curves_match(metrics, single)
    return single, Path(metrics["data"]["train_file"]).parent.parent


def _generate(model_dir: Path) -> str:
    from domaintune.model.loader import end_of_turn_token_ids, load_trained

    model, tokenizer = load_trained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=end_of_turn_token_ids(tokenizer))
    assert out.shape[1] > ids.shape[1]
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_ddp_two_processes_match_one_and_resume(tmp_path):
    config = _config(tmp_path, "ddp", distributed="ddp", max_steps=8, save_steps=4)
    single = _single(config)

    # Interrupted run: 4 of 8 steps (checkpoint-4), then --resume to step 8 under 2 processes again.
    first = _cli(str(config), "--nproc", "2", "--set", "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    half = _metrics(config)
    assert half["distributed"] == {
        "strategy": "ddp",
        "world_size": 2,
        "per_device_batch_size": 2,
        "global_batch_size": 4,
        "backend": "gloo",
    }
    for (step, a), (_, b) in zip(half["train_curve"], single["train_curve"][:4]):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}"

    resumed = _cli(str(config), "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = _metrics(config)
    assert metrics["resumed_from"].endswith("checkpoint-4") and metrics["steps"] == 8
    _assert_curves_match(metrics, single)
    assert metrics["tokens_seen"] == single["tokens_seen"]

    run = Path(metrics["data"]["train_file"]).parent.parent
    # Only rank 0 wrote reports and logs: one TensorBoard event file per launch, one progress bar.
    assert len(list((run / "train" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert resumed.stderr.count("step 5/8 ") == 1 and resumed.stderr.count("final train / val loss") == 1
    assert (run / "train" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert _generate(run / "model") is not None


def test_fsdp_full_finetune_matches_one_process_and_reloads(tmp_path):
    from safetensors.torch import load_file

    # FSDP shards the output head, so it always takes the logits_to_keep loss path: the one-process reference
    # takes the same path (the default fused head differs from it by float rounding, ~1e-5 after 4 full steps).
    config = _config(
        tmp_path,
        "fsdp",
        method="full",
        distributed={"strategy": "fsdp"},
        max_steps=4,
        save_steps=2,
        speed={"fused_head_loss": False},
    )
    single, run = _two_processes_match_one(config, "fsdp")
    # Checkpoints are sharded per rank (torch.distributed.checkpoint), the final model/ is one plain folder.
    checkpoint = run / "train" / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    got = load_file(run / "model" / "model.safetensors")
    want = load_file(Path(single["data"]["train_file"]).parent.parent / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-5
    assert _generate(run / "model") is not None


def test_failing_rank_stops_the_job_with_its_error(tmp_path):
    # A real failure inside rank 1's training step (rank 0 is then blocked in the gradient all-reduce):
    # injected through sitecustomize, which every worker imports at start-up, so the product code has no hook.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import transformers\n"
        "    _step = transformers.Trainer.training_step\n"
        "    def training_step(self, *args, **kwargs):\n"
        "        if self.state.global_step == 2:\n"
        "            raise RuntimeError('injected failure on rank 1 at step 2')\n"
        "        return _step(self, *args, **kwargs)\n"
        "    transformers.Trainer.training_step = training_step\n"
    )
    config = _config(tmp_path, "fail", distributed={"strategy": "ddp", "timeout_minutes": 2}, tracking="none")
    start = time.monotonic()
    result = _cli(str(config), "--nproc", "2", env={"PYTHONPATH": str(inject)}, timeout=180)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 2" in result.stderr
    assert "distributed training failed" in one_line(result.stderr)
    assert elapsed < 120, f"the job took {elapsed:.0f} s to stop"
    run = Path(json.loads(config.read_text())["output_dir"])
    assert not (run / "train" / "metrics.json").exists() and not (run / "model").exists()


def test_deepspeed_zero2_matches_one_process_and_reloads(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed: pip install 'domaintune[distributed]'")
    config = _config(tmp_path, "zero2", distributed="deepspeed", max_steps=4, tracking="none")
    _, run = _two_processes_match_one(config, "deepspeed")
    written = json.loads((run / "train" / "deepspeed.json").read_text())
    assert written["zero_optimization"]["stage"] == 2 and written["train_batch_size"] == 4
    assert (run / "train" / "checkpoints" / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's own checkpoint
    assert _generate(run / "model") is not None


@pytest.mark.slow
def test_deepspeed_zero3_cpu_offload_full_finetune(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed: pip install 'domaintune[distributed]'")
    config = _config(
        tmp_path,
        "zero3",
        method="full",
        max_steps=4,
        tracking="none",
        speed={"fused_head_loss": False},
        distributed={
            "strategy": "deepspeed",
            "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
        },
    )
    single = _single(config)
    result = _cli(str(config), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_curves_match(_metrics(config), single)
    run = Path(_metrics(config)["data"]["train_file"]).parent.parent
    assert (run / "model" / "model.safetensors").is_file()  # gathered from ZeRO-3 shards on save
    assert _generate(run / "model") is not None


@pytest.mark.slow
def test_fsdp_lora_matches_one_process(tmp_path):
    config = _config(tmp_path, "fsdplora", distributed="fsdp", max_steps=4)
    single = _single(config)
    result = _cli(str(config), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_curves_match(_metrics(config), single)
    run = Path(_metrics(config)["data"]["train_file"]).parent.parent
    assert (run / "model" / "adapter_model.safetensors").is_file()
    assert _generate(run / "model") is not None


@pytest.mark.slow
def test_fsdp_resume_from_sharded_checkpoint(tmp_path):
    config = _config(
        tmp_path,
        "fsdpresume",
        method="full",
        distributed="fsdp",
        max_steps=8,
        save_steps=4,
        speed={"fused_head_loss": False},
        tracking="none",
    )
    single = _single(config)
    first = _cli(str(config), "--nproc", "2", "--set", "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _cli(str(config), "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = _metrics(config)
    assert metrics["resumed_from"].endswith("checkpoint-4") and metrics["steps"] == 8
    _assert_curves_match(metrics, single)


# --------------------------------------------------------------------------- no process launched


def test_distributed_setting_shorthand_and_validation():
    assert TrainConfig(distributed="fsdp").distributed.strategy == "fsdp"
    with pytest.raises(ValueError, match="offload_param: cpu needs zero_stage 3"):
        TrainConfig(distributed={"strategy": "deepspeed", "deepspeed": {"offload_param": "cpu"}})
    with pytest.raises(ValueError):
        TrainConfig(distributed="horovod")


def test_global_batch_must_divide_over_processes():
    tcfg = TrainConfig(batch_size=6)
    assert dist.per_device_batch_size(tcfg, dist.World(0, 0, 2)) == 3
    with pytest.raises(UserError, match="batch_size: 6 does not divide over 4 processes"):
        dist.per_device_batch_size(tcfg, dist.World(0, 0, 4))


def test_nproc_with_distributed_none_is_a_clear_error(tmp_path):
    config = _config(tmp_path, "none")
    result = _cli(str(config), "--nproc", "2", timeout=60)
    assert result.returncode == 2
    assert "train.distributed is `none`" in one_line(result.stderr)


def test_torchrun_command_for_each_node():
    child = ["train", "/shared/project.yaml", "--output-dir", "/shared/runs/a"]
    single = dist.torchrun_argv(dist.LaunchSpec(nproc=4), child)
    assert single[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=4"] and "--standalone" in single
    node1 = dist.torchrun_argv(dist.LaunchSpec(2, 3, 1, "10.0.0.5", 29600), child)
    for flag in ("--nnodes=3", "--node-rank=1", "--master-addr=10.0.0.5", "--master-port=29600"):
        assert flag in node1
    assert node1[-len(child) - 2 :] == ["-m", "domaintune", *child]
    with pytest.raises(UserError, match="--master-addr"):
        dist.torchrun_argv(dist.LaunchSpec(2, 2, 0, None), child)


def test_deepspeed_config_generated_from_yaml_and_validated(tmp_path):
    tcfg = TrainConfig(
        batch_size=8,
        gradient_accumulation_steps=2,
        distributed={
            "strategy": "deepspeed",
            "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
        },
    )
    config = dist.deepspeed_config(tcfg)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu" and config["optimizer"]["type"] == "AdamW"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # model/ stays a plain folder
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == "auto"
    assert dist.validate_deepspeed_config(config, tcfg) == []

    zero2 = TrainConfig(distributed="deepspeed")
    path = dist.write_deepspeed_config(zero2, tmp_path / "train")
    written = json.loads(path.read_text())
    assert written["zero_optimization"]["stage"] == 2 and "offload_param" not in written["zero_optimization"]

    broken = dict(config, zero_optimization={**zero, "stage": 2})
    assert any("offload_param needs stage 3" in p for p in dist.validate_deepspeed_config(broken, tcfg))
    pytest.importorskip(
        "deepspeed", reason="DeepSpeed's own parser checks the rest: pip install 'domaintune[distributed]'"
    )
    wrong_batch = dict(config, train_batch_size=7)
    assert any("train_batch_size" in p for p in dist.validate_deepspeed_config(wrong_batch, tcfg))
