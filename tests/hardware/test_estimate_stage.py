"""`domaintune estimate`'s train-stage time: padding, replay, the evaluations and train.generation_eval's decoding."""

import json

import pytest

from domaintune.hardware import estimate as estimate_module
from domaintune.hardware import plan as plan_module
from domaintune.hardware.estimate import machine_load_note, measure_decode_step_seconds, padding_factor
from domaintune.hardware.probe import Hardware


def test_padding_factor_is_the_expected_longest_row_over_the_mean():
    assert padding_factor([200.0] * 10, 4) == pytest.approx(1.0)
    assert padding_factor([100.0, 300.0], 1) == 1.0
    # two rows drawn with replacement from {100, 300}: the longest is 100 a quarter of the time -> 250 / 200
    assert padding_factor([100.0, 300.0], 2) == pytest.approx(1.25)
    assert padding_factor([100.0, 300.0], 8) > padding_factor([100.0, 300.0], 2)


def test_machine_load_note_only_when_other_jobs_hold_the_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert machine_load_note(2, 2) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.0, 2.0))
    note = machine_load_note(2, 2)
    assert note is not None and "2.50" in note and "idle machine" in note
    assert machine_load_note(8, 2) is None  # 6 cores left free for the other jobs


def _project(tmp_path, train: dict, val_rows: int = 4):
    from domaintune.config import config_from_dict

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    row = json.dumps({"messages": [{"role": "user", "content": "q " * 20}, {"role": "assistant", "content": "a " * 5}]})
    (data / "train.jsonl").write_text((row + "\n") * 10)
    (data / "val.jsonl").write_text((row + "\n") * val_rows)
    base = {"eval_steps": 2, "save_steps": 2, "batch_size": 2, "max_length": 512}
    return config_from_dict(
        {
            "name": "t",
            "output_dir": str(tmp_path),
            "model": {"name_or_path": "tiny-random-llama"},
            "train": base | train,
        }
    )


@pytest.fixture
def probes(monkeypatch):
    """Fixed CPU probes; records the decode probe's arguments."""
    calls: list[dict] = []

    def decode(model_dir, **kwargs):
        calls.append(kwargs)
        return 0.5

    monkeypatch.setattr(plan_module, "detect_hardware", lambda: Hardware("cpu", 2, 8.0, set()))
    monkeypatch.setattr(plan_module, "measure_cpu_flops", lambda precision: 1e11)
    monkeypatch.setattr(plan_module, "measure_decode_step_seconds", decode)
    return calls


def _lora_stage(cfg):
    plan = plan_module.plan_estimates(cfg, gpus=[])
    target = plan.targets[0]
    lora = next(e for e in target.estimates if e.method == "lora")
    return plan, target, plan_module.stage_seconds(plan, target, lora)


def test_generation_eval_adds_its_decode_steps_at_the_probed_step_time(tmp_path, probes):
    generation = {"items": 3, "batch_size": 2, "max_new_tokens": 8, "repetition_penalty": 1.05}
    # 5 steps, eval_steps 2: evaluations at steps 0, 2, 4 and the last step (5) -> 4
    off_plan, _, off = _lora_stage(_project(tmp_path, {"max_steps": 5}))
    assert off_plan.decode_steps == 0 and off_plan.prefill_tokens == 0
    assert probes == []  # generation_eval off: no decode probe
    plan, target, on = _lora_stage(_project(tmp_path, {"max_steps": 5, "generation_eval": generation}))
    assert probes == [{"batch": 2, "precision": "fp32", "lora_r": 8, "repetition_penalty": 1.05}]
    assert target.decode_step_seconds == 0.5
    assert plan.decode_steps == 4 * 2 * 8  # evaluations x batches of 2 (3 items) x max_new_tokens
    assert plan.prefill_tokens > 0
    assert plan.eval_tokens == off_plan.eval_tokens
    assert on is not None and off is not None
    assert on - off > plan.decode_steps * 0.5  # + the prefills
    assert "generation eval: 4 evaluations" in plan.header
    dpo = next(e for e in target.estimates if e.method == "dpo")  # dpo's val rows are pairs: no generation eval
    assert plan_module.stage_seconds(plan, target, dpo) == plan_module.stage_seconds(off_plan, target, dpo)


def test_replay_rows_add_steps_and_padding_is_counted(tmp_path, probes):
    cfg = _project(tmp_path, {"epochs": 1})
    plan, _, _ = _lora_stage(cfg)
    assert "replay rows" not in plan.header
    general = json.dumps({"messages": [{"role": "user", "content": "g"}, {"role": "assistant", "content": "h"}]})
    (tmp_path / "data" / "general.jsonl").write_text((general + "\n") * 6)
    replayed = _project(tmp_path, {"epochs": 1, "replay": {"ratio": 0.4}})
    shape = plan_module.run_shape_from_config(replayed)
    plan_module._run_tokens(replayed, shape, None)
    assert shape.steps == 7  # (10 domain + 4 replay rows) / batch 2
    assert shape.padding > 1.0  # short general rows share batches with long domain rows
    plain = plan_module.run_shape_from_config(cfg)
    plan_module._run_tokens(cfg, plain, None)
    assert plain.steps == 5 and plain.padding == pytest.approx(1.0)  # equal rows: nothing padded


def test_decode_probe_times_the_model_from_its_config(tiny_model_dir):
    """The probe builds the model from config.json (random weights) and runs greedy decode steps, with LoRA too."""
    plain = measure_decode_step_seconds(tiny_model_dir, batch=2)
    with_lora = measure_decode_step_seconds(tiny_model_dir, batch=2, lora_r=4, repetition_penalty=1.05)
    assert plain > 0 and with_lora > 0


def test_decode_probe_extrapolates_large_models_from_three_layers(tiny_model_dir, monkeypatch):
    depths: list[int] = []

    def fake(config, dtype, batch, prompt_tokens, lora_r, repetition_penalty):
        depths.append(config.num_hidden_layers)
        return 0.01 + 0.002 * config.num_hidden_layers  # 10 ms fixed + 2 ms per layer

    monkeypatch.setattr(estimate_module, "DECODE_PROBE_WHOLE_MODEL_BYTES", 1)
    monkeypatch.setattr(estimate_module, "_time_decode", fake)
    layers = estimate_module.model_shape_from_config(tiny_model_dir).layers
    assert measure_decode_step_seconds(tiny_model_dir, batch=2) == pytest.approx(0.01 + 0.002 * layers)
    assert depths == [1, 3]
