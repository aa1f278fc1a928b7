"""The annotation task file: what to sample, the labelling schema, who labels, the agreement gate, arbitration."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from domaintune.errors import UserError
from domaintune.utils.config_types import ConfigPath, StrictModel

LabelKind = Literal["single", "multi", "spans", "text", "term"]


class LabelSpec(StrictModel):
    """One question asked about every item."""

    name: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Field name of the label on each row.")
    kind: LabelKind = Field(
        ...,
        description="single: one class (intents); multi: any number of classes; spans: entity spans in `field`; "
        "text: a free-text correction of `field` (e.g. the answer); term: one code of the `codes` list (ICD-10).",
    )
    labels: list[str] = Field(default_factory=list, description="Classes (single/multi) or entity types (spans).")
    field: str = Field("instruction", description="spans/text: the item field the label refers to.")
    codes: ConfigPath | None = Field(None, description="term: a code list file (TSV/CSV `code<TAB>name`, or JSON).")
    required: bool = Field(True, description="An item is not finished until this label is given.")

    @model_validator(mode="after")
    def _check(self) -> LabelSpec:
        if self.kind in ("single", "multi", "spans") and len(self.labels) < 1:
            raise ValueError(f"label {self.name!r} ({self.kind}) needs `labels`")
        if self.kind == "single" and len(self.labels) < 2:
            raise ValueError(f"label {self.name!r} (single) needs at least two labels")
        if self.kind == "term" and self.codes is None:
            raise ValueError(f"label {self.name!r} (term) needs `codes` (a code list file)")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"label {self.name!r}: duplicate labels")
        return self


class SampleFrom(StrictModel):
    """Where items come from: a source of the project's `data.sources` (raw rows) or a split of its run folder."""

    source: str | None = Field(None, description="Name of a data source (data.sources[*].name or file stem).")
    split: Literal["train", "val", "test"] | None = Field(None, description="A split of the run's data stage.")
    n: int | None = Field(None, ge=1, description="Items sampled (deterministic); default: all rows.")
    seed: int = Field(0, description="Sampling and assignment seed.")
    exclude: list[ConfigPath] = Field(
        default_factory=list, description="Projects (folders) whose items are not sampled again (earlier rounds)."
    )

    @model_validator(mode="after")
    def _one(self) -> SampleFrom:
        if (self.source is None) == (self.split is None):
            raise ValueError("sample from exactly one of `source` or `split`")
        return self


class Arbitration(StrictModel):
    mode: Literal["expert", "majority"] = Field(
        "expert", description="expert: one expert's decision stands; majority: the most-voted value of `experts`."
    )
    experts: list[str] = Field(default_factory=list, description="Who may decide disputed items.")
    min_votes: int = Field(1, ge=1, description="majority: votes needed before a value can win.")


class TaskConfig(StrictModel):
    """An annotation task (`domaintune annotate create CONFIG --task TASK.yaml`)."""

    name: str = Field(..., description="Project name; the folder is `<run>/annotate/<name>` unless --out is given.")
    instructions: str = Field("", description="Guidelines shown to annotators at the top of the form.")
    sample: SampleFrom
    show: list[str] = Field(
        default_factory=lambda: ["instruction", "output"], description="Item fields shown to annotators."
    )
    schema_: list[LabelSpec] = Field(..., alias="schema", min_length=1, description="The labels asked for.")
    annotators: list[str] = Field(..., min_length=2, description="Annotator names; items are dealt out in turn.")
    per_item: int = Field(2, ge=2, description="Annotators per item (blind to each other).")
    min_kappa: float = Field(0.85, ge=-1, le=1, description="Gate: overall kappa must reach this to finalise.")
    arbitration: Arbitration = Field(default_factory=Arbitration)
    output_field: str | None = Field(
        None, description="A `text` label whose adjudicated value becomes the row's output (corrected answer)."
    )

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.per_item > len(self.annotators):
            raise ValueError(f"per_item {self.per_item} > {len(self.annotators)} annotators")
        if len(set(self.annotators)) != len(self.annotators):
            raise ValueError("annotator names must be distinct")
        names = [s.name for s in self.schema_]
        if len(set(names)) != len(names):
            raise ValueError("schema: label names must be distinct")
        if self.output_field is not None:
            spec = next((s for s in self.schema_ if s.name == self.output_field), None)
            if spec is None or spec.kind != "text":
                raise ValueError(f"output_field {self.output_field!r} must name a `text` label of the schema")
        return self

    def spec(self, name: str) -> LabelSpec:
        return next(s for s in self.schema_ if s.name == name)


def load_task(path: str | Path, overrides: dict | None = None) -> TaskConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: task file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    data.update(overrides or {})
    return task_from_dict(data, path.resolve().parent, str(path))


def task_from_dict(data: dict, base_dir: Path, source: str = "task") -> TaskConfig:
    from domaintune.config import format_validation_error

    try:
        return TaskConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None


def load_codes(path: Path) -> dict[str, str]:
    """A code list: TSV/CSV lines `code<sep>name` (a header starting with `code` is skipped), or a JSON mapping."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: code list not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        return {str(k): str(v) for k, v in (data.items() if isinstance(data, dict) else data)}
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    codes: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        code, _, name = line.partition(sep)
        if code.strip().lower() == "code":
            continue
        codes[code.strip()] = name.strip().strip('"')
    if not codes:
        raise UserError(f"{path}: no codes")
    return codes
