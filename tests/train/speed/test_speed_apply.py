"""`train.speed`: one config section for every lever, `speed.apply` switches them on and says why, and a real
`run_train` records in metrics.json what was engaged."""

from __future__ import annotations

import json

import pytest

from domaintune.config import ConfigError
from domaintune.layout import RunLayout
from domaintune.train import speed
from domaintune.train.config import TrainConfig
from domaintune.train.methods import build_trainable
from train_helpers import KEPT_MALLOC, N_LINEAR_LORA_LAYERS, is_glibc_linux, make_run_dir, tiny_config

LEVERS = (
    "attention",
    "fused_head_loss",
    "fused_lora_linear",
    "cheap_mask_dropout",
    "keep_freed_buffers",
    "half_precision_base",
    "lora_input_cast",
)


@pytest.mark.skipif(not is_glibc_linux(), reason="mallopt tuning applies to Linux/glibc only")
@pytest.mark.parametrize("keep", [True, False])
def test_run_train_records_allocator_and_speed_levers(tmp_path, keep):
    from domaintune.train.runner import run_train

    run = make_run_dir(tmp_path, n_train=8, n_val=4, n_general=4)
    metrics = run_train(tiny_config(speed={"keep_freed_buffers": keep}, max_steps=2), RunLayout(run))
    assert metrics["steps"] == 2
    assert metrics["device"]["allocator"] == (KEPT_MALLOC if keep else {"malloc": "unchanged"})
    params = metrics["params"]
    assert params["method"] == "lora"
    assert params["attention"] == "domaintune_cpu"
    assert params["fused_head_loss"] is True
    assert params["cheap_mask_dropout"] == N_LINEAR_LORA_LAYERS  # default LoRA dropout 0.05
    assert params["fused_lora_linear"] == N_LINEAR_LORA_LAYERS
    on_disk = json.loads((run / "train" / "metrics.json").read_text())
    assert on_disk["device"]["allocator"] == metrics["device"]["allocator"]
    assert on_disk["params"]["fused_lora_linear"] == N_LINEAR_LORA_LAYERS
    # And why each lever is on or off.
    assert set(on_disk["speed"]) == set(LEVERS)
    assert on_disk["speed"]["keep_freed_buffers"].startswith(
        "glibc" if keep else "off (train.speed.keep_freed_buffers)"
    )
    assert on_disk["speed"]["lora_input_cast"] == "precision fp32"
    # What precision and threads were used, and why (tiny_config sets fp32; threads are `auto`).
    assert on_disk["chosen"]["precision"] == {"value": "fp32", "reason": "set in the config"}
    assert on_disk["chosen"]["num_threads"]["reason"].startswith("auto: ")
    assert on_disk["device"]["threads"] == on_disk["chosen"]["num_threads"]["value"]


@pytest.mark.parametrize(
    ("method", "engaged", "reason"),
    [
        ("dora", {"cheap_mask_dropout"}, {"fused_lora_linear": "method dora has no plain LoRA layers"}),
        ("ia3", set(), {"cheap_mask_dropout": "method ia3 has no LoRA dropout"}),
        ("prefix", set(), {"fused_head_loss": "the model loss computes its own logits"}),
    ],
)
def test_speed_apply_engages_only_what_the_method_has(tiny_model_dir, method, engaged, reason):
    cfg = TrainConfig(method=method, speed={"keep_freed_buffers": False})
    model, _ = build_trainable(method, cfg, tiny_model_dir, None, "float32")
    report = speed.apply(model, cfg)
    lora_levers = {"cheap_mask_dropout", "fused_lora_linear", "lora_input_cast"}
    assert lora_levers & set(report) == engaged
    assert ("fused_head_loss" in report) == (method != "prefix")
    assert report["allocator"] == {"malloc": "unchanged"}
    assert set(report["why"]) == set(LEVERS)
    for lever, why in reason.items():
        assert report["why"][lever] == why


def test_speed_apply_leaves_a_sharded_head_to_the_positions_loss(tiny_model_dir):
    cfg = TrainConfig(method="full", speed={"keep_freed_buffers": False})
    model, _ = build_trainable("full", cfg, tiny_model_dir, None, "float32")
    assert speed.apply(model, cfg)["fused_head_loss"] is True
    report = speed.apply(model, cfg, sharded_head=True)
    assert report["fused_head_loss"] is False and "shard the output head" in report["why"]["fused_head_loss"]


@pytest.mark.parametrize(
    ("train", "dtype"),
    [
        ({"precision": "bf16"}, "bfloat16"),
        ({"precision": "bf16", "speed": {"half_precision_base": False}}, "float32"),
        ({"precision": "bf16", "method": "full"}, "float32"),
        ({"precision": "fp32"}, "float32"),
        ({"precision": "bf16", "method": "dpo", "dpo": {"adapter": "ia3"}}, "bfloat16"),
    ],
)
def test_half_precision_base_only_for_a_frozen_adapter_base(train, dtype):
    assert speed.base_dtype(TrainConfig(**train), "float32") == dtype


@pytest.mark.parametrize(
    ("train", "moved"),
    [
        ({"attention": "sdpa"}, "train.attention is now train.speed.attention"),
        ({"fused_head_loss": False}, "train.fused_head_loss is now train.speed.fused_head_loss"),
        ({"keep_freed_buffers": False}, "train.keep_freed_buffers is now train.speed.keep_freed_buffers"),
        ({"half_precision_base": False}, "train.half_precision_base is now train.speed.half_precision_base"),
        ({"lora": {"fused_linear": False}}, "train.lora.fused_linear is now train.speed.fused_lora_linear"),
        (
            {"lora": {"cheap_mask_dropout": False}},
            "train.lora.cheap_mask_dropout is now train.speed.cheap_mask_dropout",
        ),
    ],
)
def test_the_old_speed_keys_name_their_new_place(train, moved):
    with pytest.raises(ConfigError, match=moved.replace(".", r"\.")):
        tiny_config(**train)
