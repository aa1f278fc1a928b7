"""train/loss.png: training and validation loss against optimizer steps (and train.generation_eval's metric)."""

from __future__ import annotations

from pathlib import Path

# What train.generation_eval can log (as `eval_<name>`).
GENERATION_METRIC_KEYS = {f"rouge{n}_{level}" for n in "12L" for level in ("char", "word")} | {
    "bleu", "chrf", "exact_match", "token_f1",
}  # fmt: skip


def plot_losses(log_history: list[dict], path: Path, title: str = "loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "eval_loss" not in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="val loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    metric = _generation_metric(log_history)
    if metric:
        points = [(h["step"], h[metric]) for h in log_history if metric in h]
        right = ax.twinx()  # the metric (0-100, higher is better) on a second axis
        right.plot(*zip(*points), label=f"val {metric[5:]}", color="tab:green", marker="s", linewidth=1.5)
        right.set_ylabel(f"{metric[5:]} (greedy answers, 0-100)")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _generation_metric(log_history: list[dict]) -> str | None:
    """The `eval_<metric>` key train.generation_eval logged, if any."""
    for h in log_history:
        for key in h:
            if key.startswith("eval_") and key[5:] in GENERATION_METRIC_KEYS:
                return key
    return None
