"""The `data:` section: sources (`source_config.py`), cleaning operations, split, output format, augmentation
(`augment/config.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from domaintune.data.augment.config import AugmentConfig
from domaintune.data.source_config import SourceConfig
from domaintune.utils.config_types import ConfigPath, StrictModel


class NormaliseConfig(StrictModel):
    enabled: bool = True
    width: bool = Field(
        True,
        description="Full-width ASCII letters and digits to half-width (ＡＢＣ１２３ → ABC123), half-width katakana to "
        "full-width. CJK full-width punctuation (，？：；（）) is kept: the text keeps its script.",
    )
    nfkc: bool = Field(
        False,
        description="Full Unicode NFKC instead (the old default): also turns CJK punctuation into ASCII (，→,) and "
        "² into 2. Applied to the system prompt too.",
    )
    html: bool = Field(True, description="Unescape HTML entities and strip tags.")
    control_chars: bool = Field(True, description="Remove control characters (keeps newline and tab).")
    whitespace: bool = Field(True, description="Collapse runs of spaces; at most one blank line; strip.")


class FilterConfig(StrictModel):
    required: list[str] | None = Field(
        None, description="Fields that must be non-empty (default: the mapped instruction/output, messages or text)."
    )
    min_chars: int | dict[str, int] | None = Field(
        None, description="Minimum length in characters: an int for the whole row, or {field: n} per field."
    )
    max_chars: int | dict[str, int] | None = Field(None, description="Maximum length in characters (int or per field).")
    min_tokens: int | None = Field(None, description="Minimum row length in tokens of `model`'s tokenizer.")
    max_tokens: int | None = Field(None, description="Maximum row length in tokens of `model`'s tokenizer.")
    outlier_sigma: float | None = Field(3.0, description="Drop rows whose length is beyond mean ± k·σ (null: off).")
    max_repetition: float | None = Field(
        0.5, description="Drop rows whose duplicated n-gram ratio exceeds this (null: off)."
    )
    language: Literal["zh", "en"] | None = Field(None, description="Keep only rows in this language (script-based).")


class DedupConfig(StrictModel):
    exact: bool = Field(True, description="Drop rows whose normalised text was seen before.")
    near: bool = Field(True, description="MinHash-LSH near-duplicate removal (keep the first).")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard threshold of shingle sets.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    char_ngram: int = Field(5, ge=1, description="Shingle size in characters for CJK text.")
    word_ngram: int = Field(3, ge=1, description="Shingle size in words for other text.")
    fields: list[str] = Field(
        default_factory=lambda: ["instruction", "input", "output"],
        description="Fields compared (messages rows use all message contents).",
    )
    max_clusters_reported: int = Field(20, description="How many duplicate clusters the report samples.")
    on: Literal["prompt", "row"] | None = Field(
        None,
        description="Preference, unpaired and prompt rows (data.kind): compare the prompt only (`prompt`) or the "
        "prompt with every answer (`row`). Default: `prompt` for prompt rows; `row` for pairs and unpaired rows, "
        "where several comparisons or labelled answers per prompt are normal (split.group_by: prompt still keeps "
        "them in one split).",
    )


class PiiConfig(StrictModel):
    enabled: bool = True
    types: list[str] | None = Field(
        None,
        description="Types to redact (default all): phone, id_card, bank_card, landline, email, ipv4, url.",
    )


class DecontamConfig(StrictModel):
    """Train rows that repeat a val/test prompt are dropped (and val rows that repeat a test prompt): the same
    prompt after normalisation (case, width, punctuation, whitespace), a near-duplicate prompt (MinHash), or a
    shared long n-gram. Each quarantine row names the val/test row it matched."""

    enabled: bool = True
    near_threshold: float | None = Field(
        0.85,
        gt=0,
        le=1,
        description="Two prompts are near duplicates when the Jaccard similarity of their character n-grams "
        "(data.dedup.char_ngram) and that of their word 2-grams (CJK: characters only) both reach this; also "
        "groups the split (split.group_by: prompt). At 0.8, one word changed in a ten-word question template "
        "(`... ataxia type 1 ?`, `... type 2 ?`) already counts. null: exact prompts and n-grams only.",
    )
    ngram: int = Field(13, ge=4, description="n-gram length (words; characters for CJK) that counts as overlap.")
    scope: Literal["prompt", "all"] = Field(
        "prompt",
        description="Text compared: the user prompt (default; shared answer boilerplate is not contamination) "
        "or the whole row.",
    )


_RESERVED_SET_NAMES = ("train", "val", "test", "general")


class HoldoutGroupConfig(StrictModel):
    """Whole groups of rows (a source, a department, a category, the latest dates) kept out of train, val and test
    and written to data/holdout_<name>.jsonl: an out-of-source test set that eval scores beside the test split."""

    field: str = Field(
        ...,
        description="`source` (the source's `name`) or a field kept by the sources (sources[*].keep), e.g. "
        "department, category, or a date field with `after`.",
    )
    values: list[str | int] | None = Field(
        None, description="Rows whose field equals one of these (compared as text) are held out."
    )
    after: str | None = Field(
        None,
        description="A date (e.g. 2024-06-01): rows whose date field is later are held out; a row whose date does "
        "not parse is dropped with stage `split`. Give `values` or `after`, not both.",
    )
    name: str = Field(
        "out_of_source",
        description="The holdout's name: its file is data/holdout_<name>.jsonl and eval scores it as the set "
        "of that name (gates `sets.<name>.<metric>_delta_ci_low > 0`).",
    )
    max_rows: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many held-out rows (deterministic, seeded); the others are dropped as "
        "sampled out. Decontamination runs against the rows kept.",
    )
    dev_rows: int | None = Field(
        None,
        ge=1,
        description="Rows of the held-out groups set aside as a selection (dev) set, written to "
        "data/holdout_<name>_dev.jsonl and scored by eval as the set `<name>_dev`: choose recipes (`domaintune "
        "sweep`'s objective) on it and keep data/holdout_<name>.jsonl for the gates, which are then not biased "
        "by the choice. Drawn first, by whole prompt groups (data.split.group_by), seeded with the split seed, "
        "from every row of the held-out groups; max_rows then caps the rest. Never shares a row or a prompt group "
        "with the gated file; train and val rows repeating a dev prompt are dropped like those repeating a "
        "holdout prompt. Set it in the project config, not only in a sweep overlay: the gated file differs "
        "with and without it.",
    )

    @model_validator(mode="after")
    def _check(self) -> HoldoutGroupConfig:
        import re

        if (self.values is None) == (self.after is None):
            raise ValueError("holdout_group: give exactly one of `values` (a list) or `after` (a date)")
        if self.values is not None and not self.values:
            raise ValueError("holdout_group.values is empty: list the groups to hold out")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name) or self.name in _RESERVED_SET_NAMES:
            raise ValueError(
                f"holdout_group.name {self.name!r}: use letters, digits and _ (not {', '.join(_RESERVED_SET_NAMES)})"
            )
        if self.after is not None:
            import pandas as pd

            if pd.isna(pd.to_datetime(self.after, errors="coerce")):
                raise ValueError(f"holdout_group.after {self.after!r} is not a date (e.g. 2024-06-01)")
        return self


_DEFAULT_RATIOS: list[float] = [8, 1, 1]  # ints on purpose: the dumped config (and so the fingerprint) says 8, 1, 1


class SplitConfig(StrictModel):
    ratios: list[float] = Field(default_factory=lambda: _DEFAULT_RATIOS.copy(), description="train:val:test ratios.")
    by: Literal["random", "stratified", "time"] = Field("random", description="How rows are assigned.")
    stratify_field: str | None = Field(None, description="Field stratified on (by: stratified).")
    time_field: str | None = Field(None, description="Date field (by: time); the newest rows go to test.")
    seed: int | None = Field(None, description="Split seed (default: the project seed).")
    group_by: list[str] = Field(
        default_factory=lambda: ["prompt"],
        description="Rows that share a group land in the same split. `prompt`: the same prompt after normalisation "
        "(case, width, punctuation, whitespace) or a near-duplicate one (decontaminate.near_threshold), so a repeated "
        "question never sits on both sides; any kept field (e.g. `focus`, a document, patient or customer id); "
        "several are combined (rows linked by any of them stay together). [] or null: every row on its own.",
    )
    holdout_group: HoldoutGroupConfig | None = Field(
        None,
        description="Hold whole groups out of train/val/test as an out-of-source test set, e.g. "
        "`{field: source, values: [NIDDK]}`, `{field: department, values: [...]}` or `{field: created_at, after: "
        "2024-06-01}`; written to data/holdout_<name>.jsonl, decontaminated against train and val like test, "
        "and accounted in the report like every other row.",
    )

    @field_validator("group_by", mode="before")
    @classmethod
    def _group_list(cls, value):
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or sum(self.ratios) <= 0:
            raise ValueError("ratios must be three non-negative numbers (train, val, test)")
        if self.by == "stratified" and not self.stratify_field:
            raise ValueError("by: stratified needs stratify_field")
        if self.by == "time" and not self.time_field:
            raise ValueError("by: time needs time_field")
        return self


class GuardConfig(StrictModel):
    """Checks on the finished split: the stage fails (or warns) instead of quietly shipping a broken one."""

    max_removed: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Largest share of a split (or, before the split, of the rows) that one step after cleaning may "
        "remove: outliers, unparseable dates, decontamination. data.sample caps are not counted.",
    )
    max_ratio_drift: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Largest difference between a split's share of the rows and its share in split.ratios "
        "(before data.sample caps), e.g. 0.1: a 0.8 train share may come out between 0.7 and 0.9.",
    )
    on_violation: Literal["fail", "warn"] = Field(
        "fail", description="`fail`: the data stage exits non-zero (outputs and report written); `warn`: it goes on."
    )


class DifficultyConfig(StrictModel):
    enabled: bool = True
    by: str = Field("length", description="`length` (answer length) or the name of a numeric field.")
    field: str = Field("difficulty", description="Name of the field written on each row (easy/medium/hard).")


class SampleConfig(StrictModel):
    """Deterministic down-sampling after the split; rows not taken are accounted as `sampled_out`."""

    train: int | None = Field(None, description="Keep at most this many train rows.")
    val: int | None = Field(None, description="Keep at most this many validation rows.")
    test: int | None = Field(None, description="Keep at most this many test rows.")


class GeneralConfig(StrictModel):
    """The general-domain set, split by task into a replay pool (data/general.jsonl, what `train.replay` mixes in)
    and a held-out retention set (data/general_holdout.jsonl, what eval measures forgetting on). The two never share
    a task, so replay cannot inflate the retention score."""

    path: ConfigPath = Field(..., description="Self-instruct style JSONL (instruction, instances[{input,output}]).")
    max_rows: int | None = Field(None, description="Keep at most this many rows (deterministic).")
    holdout: float = Field(
        0.25,
        ge=0.0,
        description=(
            "Tasks held out for the retention check, written to data/general_holdout.jsonl: a fraction (< 1) of "
            "the tasks, or a number of tasks (>= 1). 0 writes every row to general.jsonl (then replay and "
            "retention cannot both use it)."
        ),
    )


class RayConfig(StrictModel):
    """Where the `engine: ray` data stage runs (see docs/data-at-scale.md).

    Distributed on the cluster: per-row work (field mapping, normalisation, PII redaction, filters,
    row hashes and MinHash signatures) as Ray Data `map_batches`, exact-duplicate grouping and the
    near-duplicate banding (group by LSH band key, verify candidate pairs) as Ray Data shuffles.
    On the driver: reading the sources, the keep-first resolution of verified pairs, outliers,
    split, decontamination, sampling and writing, so outputs are byte-identical to `engine: local`.
    """

    address: str | None = Field(
        None,
        description="null: start a Ray instance inside this process (num_cpus); `auto`: join the cluster started "
        "with `ray start` on this node; `ray://host:10001`: Ray Client to a remote head node.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the in-process Ray instance (address null; default: all of this machine)."
    )
    batches_per_block: int = Field(
        8,
        ge=1,
        description="data.batch_size chunks per Ray block, i.e. per map task (fewer, larger tasks "
        "cost less scheduling; the outputs do not depend on it).",
    )
    shuffle_partitions: int | None = Field(
        None, ge=1, description="Partitions of the dedup shuffles (default: 2 x the cluster's CPUs)."
    )
    shuffle_strategy: Literal["sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle"] = Field(
        "sort_shuffle_pull_based",
        description="Ray Data shuffle used by the dedup group-bys (sort-based measured 3-7x faster than "
        "hash_shuffle on 7,644 rows / 2 CPUs; hash_shuffle suits very large clusters).",
    )
    ship_code: bool = Field(
        True,
        description="With an address: send this domaintune package to the workers (runtime_env py_modules); "
        "its dependencies must be installed on every node.",
    )


DataKind = Literal["sft", "preference", "unpaired", "prompt"]


class DataConfig(StrictModel):
    sources: list[SourceConfig] = Field(default_factory=list, description="Inputs; rows are read in this order.")
    kind: DataKind = Field(
        "sft",
        description="What the rows are. `sft`: chats / QA pairs / text (written in data.format). `preference`: "
        "pairs (prompt/chosen/rejected as text or messages; TRL's explicit and implicit-prompt layouts; "
        "LLaMA-Factory's alpaca `instruction`/`input` and sharegpt `conversations` with `chosen`/`rejected`) for "
        "dpo/orpo/simpo/reward (kto reads each pair as two rows, grpo/ppo their prompts). `unpaired`: "
        "prompt/completion/label (or `desirable`, or a `rating` sign) for kto. `prompt`: prompt rows (`prompt`, or "
        "a chat whose last answer becomes `reference`) for grpo/ppo. Non-sft rows are written as "
        "{id, prompt: [messages], chosen/rejected | completion/label | reference, source, kept fields} to the same "
        "data/{train,val,test}.jsonl, which those methods read when train.<method>.path is not set.",
    )
    normalise: NormaliseConfig = Field(default_factory=NormaliseConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    decontaminate: DecontamConfig = Field(default_factory=DecontamConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    guards: GuardConfig = Field(default_factory=GuardConfig)
    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Optional per-split row caps.")
    format: Literal["messages", "alpaca", "sharegpt"] = Field("messages", description="Output row format.")
    system_prompt: str | None = Field(None, description="System prompt added to every row (messages/sharegpt).")
    general: GeneralConfig | None = Field(None, description="Optional general-domain set for replay.")
    batch_size: int = Field(256, ge=1, description="Rows per work unit sent to a worker process (or Ray task).")
    engine: Literal["local", "ray"] = Field(
        "local",
        description="`local`: this machine (worker processes with --workers); `ray`: the same operations as Ray "
        "Data transforms on a Ray cluster (data.ray), with byte-identical outputs.",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster settings (engine: ray).")
    augment: AugmentConfig | None = Field(
        None, description="Optional augmentation/synthesis of the train split (see data.augment)."
    )

    @field_validator("sample", mode="before")
    @classmethod
    def _no_sample(cls, value):
        return {} if value is None else value  # `sample: null` means no caps
