"""train.neftune_noise_alpha: transformers' NEFTune noise on the input embeddings in training steps only, through
LoRA with the CPU speed levers on (fused LoRA linear, label-token head) and through prompt learning."""

from __future__ import annotations

import math

import pytest

from domaintune.layout import RunLayout
from domaintune.train.runner import run_train
from train_helpers import make_run_dir, tiny_config

ALPHA = 5.0


class EmbeddingProbe:
    """Records, for every forward of the input embeddings, whether the module was training and how far its output
    is from the plain lookup (max |output - embedding(input_ids)|) and the bound NEFTune's noise keeps within."""

    def __init__(self):
        from transformers import TrainerCallback

        probe = self
        self.calls: list[tuple[bool, float, float]] = []

        def hook(module, inputs, output):
            import torch

            plain = torch.nn.functional.embedding(inputs[0], module.weight)
            bound = ALPHA / math.sqrt(output.size(1) * output.size(2))
            probe.calls.append((module.training, float((output - plain).abs().max()), bound))

        class _Callback(TrainerCallback):
            # on_train_begin runs after Trainer.train attached NEFTune's hook, so this one sees its output
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                probe.handle = model.get_input_embeddings().register_forward_hook(hook)

            def on_train_end(self, args, state, control, **kwargs):
                probe.handle.remove()

        self.callback = _Callback()

    def training(self) -> list[tuple[float, float]]:
        return [(diff, bound) for training, diff, bound in self.calls if training]

    def evaluation(self) -> list[float]:
        return [diff for training, diff, _ in self.calls if not training]


def _train(tmp_path, method: str, alpha: float | None) -> tuple[dict, EmbeddingProbe]:
    run = make_run_dir(tmp_path / f"{method}-{alpha}", n_train=8, n_val=4)
    probe = EmbeddingProbe()
    cfg = tiny_config(method=method, neftune_noise_alpha=alpha, seed=3)
    return run_train(cfg, RunLayout(run), extra_callbacks=[probe.callback]), probe


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_noise_in_training_steps_only(tmp_path, method):
    noisy, noisy_probe = _train(tmp_path, method, ALPHA)
    clean, clean_probe = _train(tmp_path, method, None)

    assert noisy["neftune"] == {"on": True, "noise_alpha": ALPHA}
    assert clean["neftune"] == {"on": False, "noise_alpha": None}
    if method == "lora":  # the CPU speed levers were on, and NEFTune works with them
        assert noisy["params"]["fused_lora_linear"] > 0 and noisy["params"]["fused_head_loss"] is True

    # training forwards: noise within NEFTune's bound; none without alpha
    trained = noisy_probe.training()
    assert trained and all(0 < diff <= bound for diff, bound in trained)
    assert clean_probe.training() and all(diff == 0 for diff, _ in clean_probe.training())
    # evaluation forwards (val loss): the plain embeddings, so the step-0 val loss (same weights) is identical
    assert noisy_probe.evaluation() and all(diff == 0 for diff in noisy_probe.evaluation())
    assert noisy["step0_val_loss"] == clean["step0_val_loss"]
    # the first training step (same weights, same batch) sees different embeddings, so a different loss
    assert noisy["train_curve"][0][0] == clean["train_curve"][0][0] == 1
    assert noisy["train_curve"][0][1] != clean["train_curve"][0][1]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"method": "dpo"}, "SFT methods only"),
        ({"method": "distill", "distill": {"teacher": "tiny-random-llama"}}, "SFT methods only"),
        ({"method": "grpo", "grpo": {"rewards": [{"type": "no_pii"}]}}, "SFT methods only"),
        ({"method": "lora", "packing": True}, "cannot be used with packing"),
    ],
)
def test_rejected_where_it_cannot_apply(train, message):
    with pytest.raises(Exception, match=rf"train\.neftune_noise_alpha \(5\.0\).*{message}"):
        tiny_config(neftune_noise_alpha=ALPHA, **train)


def test_negative_alpha_rejected():
    with pytest.raises(Exception, match="neftune_noise_alpha"):
        tiny_config(neftune_noise_alpha=-1.0)
