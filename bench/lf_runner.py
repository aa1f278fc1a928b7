"""Runs LLaMA-Factory's SFT (LoRA) inside its own venv and writes the same step-time figures as domaintune.

Usage (by bench_train.py): PYTHONPATH=bench/lf_shim /work/lf-venv/bin/python bench/lf_runner.py CONFIG.json OUT.json
Tokens/s is measured exactly as domaintune measures it: non-padding tokens the Trainer fed to the model,
divided by the wall time spent inside optimizer steps (callback on_step_begin -> on_step_end).
"""

import json
import sys
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds, self.tokens, self._t, self._n = 0.0, 0, None, 0
        self.log_history = []

    def on_step_begin(self, args, state, control, **kw):
        self._t, self._n = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        self.seconds += time.perf_counter() - self._t
        self.tokens += state.num_input_tokens_seen - self._n

    def on_train_end(self, args, state, control, **kw):
        self.log_history = state.log_history


def main():
    config = json.loads(open(sys.argv[1]).read())
    from llamafactory.train.tuner import run_exp

    timer = StepTimer()
    started = time.perf_counter()
    run_exp(config, callbacks=[timer])
    losses = [h["loss"] for h in timer.log_history if "loss" in h]
    summary = [h for h in timer.log_history if "train_loss" in h]
    import llamafactory
    import torch
    import transformers

    out = {
        "tokens": timer.tokens,
        "step_seconds": timer.seconds,
        "tokens_per_second": timer.tokens / timer.seconds if timer.seconds else None,
        "final_logged_loss": losses[-1] if losses else None,
        "mean_train_loss": summary[-1]["train_loss"] if summary else None,
        "steps": max((h.get("step", 0) for h in timer.log_history), default=0),
        "wall_seconds": time.perf_counter() - started,
        "versions": {"llamafactory": llamafactory.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main()
