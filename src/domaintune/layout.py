"""`RunLayout`: every path of a run folder, named once.

A run folder holds one sub-folder per stage (`data/`, `train/`, `model/`, `eval/`, `export/`) and
the pipeline's own `run/`. Stages, the CLI, the server and the registry find each other's files
through these names instead of joining strings, so a file can move in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, value: RunLayout | str | Path) -> RunLayout:
        """A layout from a layout or a run folder path (for callers outside the stage contract)."""
        return value if isinstance(value, RunLayout) else cls(Path(value))

    # -- data stage ---------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def split_file(self, split: str) -> Path:
        """`data/<split>.jsonl` for train, val or test."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLIT_NAMES)}")
        return self.data_dir / f"{split}.jsonl"

    @property
    def train_file(self) -> Path:
        return self.split_file("train")

    @property
    def val_file(self) -> Path:
        return self.split_file("val")

    @property
    def test_file(self) -> Path:
        return self.split_file("test")

    @property
    def general_file(self) -> Path:
        """The general-ability replay pool."""
        return self.data_dir / "general.jsonl"

    @property
    def general_holdout_file(self) -> Path:
        """General tasks held out for retention (absent when no holdout was asked for)."""
        return self.data_dir / "general_holdout.jsonl"

    def holdout_file(self, name: str) -> Path:
        """`data/holdout_<name>.jsonl`: the rows of data.split.holdout_group `name` (an out-of-source test set)."""
        return self.data_dir / f"holdout_{name}.jsonl"

    def holdout_dev_file(self, name: str) -> Path:
        """`data/holdout_<name>_dev.jsonl`: the selection rows of holdout `name` (data.split.holdout_group.dev_rows),
        scored by eval as the set `<name>_dev`."""
        return self.holdout_file(f"{name}_dev")

    def holdout_files(self) -> dict[str, Path]:
        """Every holdout the data stage wrote, by name."""
        return {p.stem.removeprefix("holdout_"): p for p in sorted(self.data_dir.glob("holdout_*.jsonl"))}

    @property
    def quarantine_file(self) -> Path:
        return self.data_dir / "quarantine.jsonl"

    @property
    def data_report(self) -> Path:
        return self.data_dir / "report.json"

    @property
    def data_report_html(self) -> Path:
        return self.data_dir / "report.html"

    # -- train stage --------------------------------------------------------------------------
    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def checkpoints_dir(self) -> Path:
        return self.train_dir / "checkpoints"

    @property
    def train_metrics(self) -> Path:
        return self.train_dir / "metrics.json"

    @property
    def loss_plot(self) -> Path:
        return self.train_dir / "loss.png"

    @property
    def model_dir(self) -> Path:
        """The trained model: an adapter folder or full weights, with tokenizer and `domaintune.json`."""
        return self.root / "model"

    # -- eval stage ---------------------------------------------------------------------------
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_report(self) -> Path:
        return self.eval_dir / "report.json"

    @property
    def eval_report_html(self) -> Path:
        return self.eval_dir / "report.html"

    @property
    def eval_items(self) -> Path:
        return self.eval_dir / "items.jsonl"

    @property
    def review_dir(self) -> Path:
        return self.eval_dir / "review"

    # -- export stage -------------------------------------------------------------------------
    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def export_manifest(self) -> Path:
        return self.export_dir / "manifest.json"

    # -- serving -----------------------------------------------------------------------------
    @property
    def serve_dir(self) -> Path:
        return self.root / "serve"

    @property
    def serve_store(self) -> Path:
        """The SQLite file behind keys, usage, feedback and canary state when no store_url is set."""
        return self.serve_dir / "serve.db"

    @property
    def feedback_dir(self) -> Path:
        """`domaintune feedback export` output: the next round's SFT and preference rows."""
        return self.root / "feedback"

    # -- the pipeline's own files ---------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def registered_file(self) -> Path:
        return self.run_dir / "registered.json"

    @property
    def summary_html(self) -> Path:
        return self.run_dir / "summary.html"

    def relative(self, path: Path) -> str:
        """`path` relative to the run folder, for state files and manifests."""
        return str(Path(path).relative_to(self.root))
