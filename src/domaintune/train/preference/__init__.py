"""Preference and reinforcement tuning through trl: KTO, ORPO, SimPO/CPO, reward models, PPO-style RLHF, GRPO.

`config.py` holds the `train.<family>` sections, `rows.py` the datasets, `verifiers.py` GRPO's reward
components, `reward.py` the reward model, `trainers.py` the trl trainer per method, `scoring.py` the
pass-rate / reward-score comparison eval can call.
"""

# Methods whose trainer is built here (train/trainers.py dispatches to `build_preference_trainer`).
PREFERENCE_METHODS = ("kto", "orpo", "simpo", "reward", "ppo", "grpo")
# Methods that sample completions while training.
GENERATING_METHODS = ("ppo", "grpo")
