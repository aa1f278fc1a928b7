"""Runs LLaMA-Factory's SFT (LoRA) inside its own venv and writes the same step-time figures as domaintune.

Usage (by bench_train.py): PYTHONPATH=bench/lf_shim /work/lf-venv/bin/python bench/lf_runner.py CONFIG.json OUT.json
Tokens/s is measured with the same callback as domaintune's runs (bench/batch_trace.step_clock): tokens the
Trainer fed to the model (non-padding) over the wall and CPU seconds inside optimizer steps.
It also records, per step, what was trained on (bench/batch_trace.py) so bench_train.py can check that
LLaMA-Factory and domaintune fed identical token ids with identical labels in the same order.

Template `chatml_turn_end` (registered below) is LLaMA-Factory's `chatml` with the assistant slot ending at
<|im_end|>: the stock slot `{{content}}<|im_end|>\n` also feeds and learns the newline after the end of
turn, which domaintune neither feeds nor learns (it predicts nothing at inference, where generation stops
at <|im_end|>). The benchmark rows are single-turn, so no other separator is involved.
"""

import json
import sys
import time
from pathlib import Path


def register_chatml_turn_end():
    from llamafactory.data.formatter import StringFormatter
    from llamafactory.data.template import register_template

    register_template(
        name="chatml_turn_end",
        format_user=StringFormatter(slots=["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"]),
        format_assistant=StringFormatter(slots=["{{content}}<|im_end|>"]),
        format_system=StringFormatter(slots=["<|im_start|>system\n{{content}}<|im_end|>\n"]),
        stop_words=["<|im_end|>", "<|im_start|>"],
        replace_eos=True,
    )


def main():
    config = json.loads(Path(sys.argv[1]).read_text())
    from llamafactory.train.tuner import run_exp
    from transformers import Trainer, TrainerCallback

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import batch_trace

    register_chatml_turn_end()
    records = []
    batch_trace.install(Trainer, records)
    clock = batch_trace.step_clock()
    history = []

    class KeepHistory(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            history.extend(state.log_history)

    started = time.perf_counter()
    run_exp(config, callbacks=[clock, KeepHistory()])
    losses = [h["loss"] for h in history if "loss" in h]
    summary = [h for h in history if "train_loss" in h]
    import llamafactory
    import torch
    import transformers

    out = {
        **clock.figures(),
        "final_logged_loss": losses[-1] if losses else None,
        "mean_train_loss": summary[-1]["train_loss"] if summary else None,
        "steps": max((h.get("step", 0) for h in history), default=0),
        "train_curve": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "batches": records,
        "wall_seconds": time.perf_counter() - started,
        "versions": {
            "llamafactory": llamafactory.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main()
