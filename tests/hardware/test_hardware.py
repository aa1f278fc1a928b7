"""doctor and estimate: the parameter counts the estimate uses must agree with what peft actually trains."""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.hardware.estimate import (
    RunShape,
    estimate_all,
    memory_breakdown,
    model_shape_from_config,
    trainable_params,
)


@pytest.fixture(scope="module")
def tiny_shape(tiny_model_dir):
    return model_shape_from_config(tiny_model_dir)


def test_param_count_from_config_matches_real_model(tiny_model_dir, tiny_shape):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tiny_shape.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method,use_dora", [("lora", False), ("dora", True)])
def test_lora_trainable_count_matches_peft(tiny_model_dir, tiny_shape, method, use_dora):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable_params(method, tiny_shape, RunShape(lora_r=8)) == trainable


def test_memory_orders_methods_sensibly(tiny_shape):
    run = RunShape(seq_len=256, batch_size=4, precision="bf16")
    full = sum(memory_breakdown("full", tiny_shape, run, "gpu").values())
    lora = sum(memory_breakdown("lora", tiny_shape, run, "gpu").values())
    qlora = sum(memory_breakdown("qlora", tiny_shape, run, "gpu").values())
    assert full > lora > qlora
    checkpointed = memory_breakdown(
        "lora", tiny_shape, RunShape(seq_len=256, batch_size=4, gradient_checkpointing=True), "gpu"
    )
    plain = memory_breakdown("lora", tiny_shape, RunShape(seq_len=256, batch_size=4), "gpu")
    assert checkpointed["activations"] < plain["activations"]


def test_run_time_scales_with_tokens(tiny_shape):
    small = estimate_all(tiny_shape, RunShape(total_tokens=10_000), "gpu", 100e12, ["lora"])[0]
    large = estimate_all(tiny_shape, RunShape(total_tokens=20_000), "gpu", 100e12, ["lora"])[0]
    assert large.run_seconds == pytest.approx(2 * small.run_seconds)


def test_doctor_runs_and_lists_capabilities():
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for text in ("QLoRA", "vLLM", "bundled model", "torch"):
        assert text in result.output
