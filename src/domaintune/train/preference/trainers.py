"""The trl trainer for each preference / reinforcement method.

- kto: `KTOTrainer` on unpaired rows (reference: the start model, i.e. the adapter switched off or its copy);
- orpo: `ORPOTrainer`; simpo: `CPOTrainer` with loss_type simpo (or CPO's sigmoid/hinge/ipo), both reference-free;
- reward: `RewardTrainer` on a sequence-classification model (train/preference/reward.py);
- grpo: `GRPOTrainer` with the verifiers of `train.grpo.rewards` as reward functions;
- ppo: RLHF against a trained reward model. trl 1.x no longer ships `PPOTrainer`; this is its PPO-clip objective
  as `GRPOTrainer` implements it: `num_iterations` optimisation epochs per batch of rollouts with the ratio clipped
  at `epsilon`, a KL penalty (`beta`) against the start model (base, or the SFT adapter of `train.init_from`, kept
  as a frozen copy), and the mean reward of each prompt's `num_generations` rollouts as the baseline instead of a
  learned value head.

`make_args(args_cls, **extra)` is train/trainers.py's `training_arguments` with the run's settings filled in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from domaintune.errors import UserError
from domaintune.train.config import TrainConfig

MakeArgs = Callable[..., Any]


def build_preference_trainer(tcfg: TrainConfig, parts: Any, callbacks: list, make_args: MakeArgs):
    """The trl trainer for `tcfg.method` (one of PREFERENCE_METHODS)."""
    common = {
        "model": parts.model,
        "train_dataset": parts.data.train,
        "eval_dataset": parts.data.val,
        "processing_class": parts.tokenizer,
        "callbacks": callbacks,
    }
    method = tcfg.method
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        k = tcfg.kto
        args = make_args(KTOConfig, beta=k.beta, desirable_weight=k.desirable_weight,
                         undesirable_weight=k.undesirable_weight, max_length=tcfg.max_length)  # fmt: skip
        return KTOTrainer(ref_model=None, args=args, **common)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = make_args(ORPOConfig, beta=tcfg.orpo.beta, max_length=tcfg.max_length)
        return ORPOTrainer(args=args, **common)
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        s = tcfg.simpo
        args = make_args(CPOConfig, loss_type=s.loss_type, beta=s.beta, simpo_gamma=s.gamma, cpo_alpha=s.cpo_alpha,
                         max_length=tcfg.max_length)  # fmt: skip
        return CPOTrainer(args=args, **common)
    if method == "reward":
        from trl import RewardConfig, RewardTrainer

        parts.model.config.pad_token_id = parts.tokenizer.pad_token_id
        args = make_args(RewardConfig, max_length=tcfg.max_length,
                         center_rewards_coefficient=tcfg.reward.center_rewards_coefficient)  # fmt: skip
        return RewardTrainer(args=args, **common)
    if method in ("grpo", "ppo"):
        return _rl_trainer(tcfg, parts, callbacks, make_args)
    raise ValueError(f"no preference trainer for method {method}")


def reward_functions(tcfg: TrainConfig) -> list:
    """GRPO's verifiers, or PPO's reward model, as named reward callables."""
    from domaintune.train.preference.verifiers import build_verifiers

    if tcfg.method == "ppo":
        from domaintune.train.preference.config import VerifierSpec

        assert tcfg.ppo is not None  # the config requires it for method ppo
        spec = VerifierSpec(type="reward_model", name="reward_model", reward_model=tcfg.ppo.reward_model, pass_at=0.0)
        return build_verifiers([spec])
    return build_verifiers(tcfg.grpo.rewards)


def _rl_trainer(tcfg: TrainConfig, parts: Any, callbacks: list, make_args: MakeArgs):
    from transformers.trainer_utils import IntervalStrategy
    from trl import GRPOConfig, GRPOTrainer

    from domaintune.train.callbacks import FinalEvalCallback

    g = tcfg.grpo if tcfg.method == "grpo" else tcfg.ppo
    assert g is not None
    rewards = reward_functions(tcfg)
    if tcfg.batch_size % g.num_generations:
        raise UserError(
            f"train.batch_size ({tcfg.batch_size}) counts completions: it must be a multiple of "
            f"train.{tcfg.method}.num_generations ({g.num_generations})"
        )
    extra: dict[str, Any] = {"loss_type": tcfg.grpo.loss_type, "scale_rewards": tcfg.grpo.scale_rewards}
    if tcfg.method == "ppo":
        extra = {"loss_type": "grpo", "scale_rewards": "batch"}
    args = make_args(
        GRPOConfig,
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        beta=g.beta,
        epsilon=g.epsilon,
        num_iterations=g.num_iterations,
        reward_weights=[r.spec.weight for r in rewards],
        log_completions=False,
        generation_kwargs={"use_cache": True},  # the training model's config has the KV cache off
        **extra,
    )
    # Rollout methods are judged by their rewards, not a validation loss: no evaluation, the last step is kept.
    args.eval_strategy = IntervalStrategy.NO
    args.eval_on_start = False
    args.load_best_model_at_end = False
    kept = [c for c in callbacks if not isinstance(c, FinalEvalCallback)]
    kept.append(RewardLogCallback(Path(args.output_dir).parent, tcfg.method))
    return GRPOTrainer(
        model=parts.model,
        reward_funcs=rewards,
        args=args,
        train_dataset=parts.data.train,
        processing_class=parts.tokenizer,
        callbacks=kept,
    )


class RewardLogCallback(TrainerCallback):
    """At the end: drop trl's frozen `ref` adapter copy (model/ holds the trained adapter only), and write
    train/rewards.json and train/rewards.png (loss, mean reward and each component's mean reward per step)."""

    def __init__(self, train_dir: Path, method: str):
        self.train_dir = train_dir
        self.method = method

    def on_train_end(self, args, state, control, model=None, **kwargs):
        peft_config = getattr(model, "peft_config", None)
        if peft_config is not None and "ref" in peft_config:
            model.delete_adapter("ref")
        if state.is_world_process_zero:
            curves = reward_curves(state.log_history)
            self.train_dir.mkdir(parents=True, exist_ok=True)
            (self.train_dir / "rewards.json").write_text(json.dumps(curves, indent=2), encoding="utf-8")
            plot_rewards(curves, self.train_dir / "rewards.png", title=f"{self.method}: loss and rewards")


def reward_curves(log_history: list[dict]) -> dict[str, list[list[float]]]:
    """{series: [[step, value], ...]} for loss, reward, reward_std, kl and each `rewards/<name>/mean`."""
    curves: dict[str, list[list[float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            wanted = key in ("loss", "reward", "reward_std", "kl") or (
                key.startswith("rewards/") and key.endswith("/mean")
            )
            if wanted and isinstance(value, int | float):
                name = key.removeprefix("rewards/").removesuffix("/mean") if key.startswith("rewards/") else key
                curves.setdefault(name, []).append([entry["step"], float(value)])
    return curves


def plot_rewards(curves: dict[str, list[list[float]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_reward) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for key, ax in (("loss", ax_loss), ("kl", ax_loss)):
        if curves.get(key):
            ax.plot(*zip(*curves[key], strict=True), label=key, linewidth=1.2)
    for name, points in curves.items():
        if name not in ("loss", "kl", "reward_std"):
            width = 2.0 if name == "reward" else 1.0
            ax_reward.plot(*zip(*points, strict=True), label=name, linewidth=width, marker="o", markersize=3)
    if len(curves.get("reward", [])) >= 6:  # each step sees other prompts: the trend is in the running mean
        steps, values = zip(*curves["reward"], strict=True)
        window = max(3, len(values) // 8)
        running = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                   for i in range(len(values))]  # fmt: skip
        ax_reward.plot(steps, running, label=f"reward, running mean of {window}", color="black", linestyle="--")
    for ax, label in ((ax_loss, "loss / KL"), (ax_reward, "mean reward")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
