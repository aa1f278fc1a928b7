"""The `data.augment` section: generator settings and the list of augmentation operations."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from domaintune.annotate.judge import JudgeConfig
from domaintune.data.source_config import SourceConfig
from domaintune.utils.config_types import ConfigPath, StrictModel


class GeneratorConfig(StrictModel):
    """A text generator: a local model (transformers) or an OpenAI-compatible endpoint."""

    kind: Literal["local", "openai"] = Field("local", description="`local` (transformers) or `openai` (endpoint).")
    model: str | None = Field(
        None, description="local: model name/path (default: the project's `model.name_or_path`); openai: model id."
    )
    base_url: str | None = Field(None, description="openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the API key.")
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per item at most.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (deterministic).")
    batch_size: int = Field(8, ge=1, description="Items per generate call (local) / concurrent requests (openai).")
    max_input_tokens: int = Field(
        1024, ge=8, description="local: a prompt longer than this fails (that item is quarantined)."
    )
    num_threads: int | None = Field(
        None, ge=1, description="local: torch CPU threads (default: torch's choice; set it on a shared CPU)."
    )
    timeout_s: float = Field(120.0, gt=0, description="openai: per-request timeout.")
    seed: int = Field(0, description="Sampling seed (used when temperature > 0).")

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if self.kind == "openai" and (not self.base_url or not self.model):
            raise ValueError("generator kind openai needs `base_url` and `model`")
        return self


class _Op(StrictModel):
    sources: list[str] | None = Field(None, description="Only rows of these sources (default: all train rows).")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many source rows (deterministic sample).")


class RecordsToDialogueOp(StrictModel):
    """Structured records (CSV/SQL/...) → instruction/answer pairs through Jinja templates."""

    op: Literal["records_to_dialogue"]
    source: Any = Field(..., description="A data source (same keys as data.sources[*]) read as plain records.")
    instruction: str = Field(..., description="Jinja template of the user turn; record columns are variables.")
    output: str = Field(..., description="Jinja template of the assistant turn.")
    system: str | None = Field(None, description="Optional Jinja template of a system turn.")
    max_rows: int | None = Field(None, ge=1)

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, SourceConfig):
            return value
        return SourceConfig.model_validate(value, context=info.context)

    @field_validator("instruction", "output", "system")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            from jinja2 import TemplateSyntaxError
            from jinja2.sandbox import SandboxedEnvironment

            try:
                SandboxedEnvironment().parse(value)
            except TemplateSyntaxError as e:
                raise ValueError(f"Jinja syntax error at template line {e.lineno}: {e.message}") from None
        return value


class SyntheticQAOp(_Op):
    """Passages of long texts → generated question + grounded answer, kept only when they pass the checks."""

    op: Literal["synthetic_qa"]
    field: Literal["output", "text", "instruction"] = Field(
        "output", description="Which text of a row is the document: the answer (`output`), `text` rows, the prompt."
    )
    passage_chars: int = Field(800, ge=100, description="Passages are at most this many characters.")
    min_passage_chars: int = Field(200, ge=20, description="Shorter passages are not used.")
    max_passages: int | None = Field(None, ge=1, description="Use at most this many passages (deterministic).")
    min_overlap: float = Field(0.6, ge=0, le=1, description="Share of the answer's words found in the passage.")
    question_chars: tuple[int, int] = Field((10, 300), description="Question length bounds (characters).")
    answer_chars: tuple[int, int] = Field((20, 1500), description="Answer length bounds (characters).")
    near_dup_threshold: float = Field(0.8, gt=0, le=1, description="Question vs. existing prompts (MinHash Jaccard).")


class ParaphraseOp(_Op):
    """Other ways of asking each question (the answer is kept)."""

    op: Literal["paraphrase"]
    n: int = Field(2, ge=1, le=10, description="Paraphrases asked for per question.")
    near_dup_threshold: float = Field(0.9, gt=0, le=1, description="Drop paraphrases this similar to a prompt.")


class BackTranslateOp(_Op):
    """Question → pivot language → back (zh→en→zh, en→zh→en); the answer is kept."""

    op: Literal["back_translate"]
    pivot: Literal["auto", "en", "zh"] = Field("auto", description="auto: en for Chinese questions, zh otherwise.")
    translator: GeneratorConfig | None = Field(None, description="Translation endpoint/model (default: generator).")
    near_dup_threshold: float = Field(0.95, gt=0, le=1, description="Drop round trips this similar to the prompt.")


EdaMethod = Literal["synonym", "swap", "delete"]
EDA_METHODS: tuple[EdaMethod, ...] = ("synonym", "swap", "delete")


class LexicalOp(_Op):
    """EDA on the question: glossary synonym replacement, random swap, random deletion (jieba for Chinese)."""

    op: Literal["lexical"]
    glossary: ConfigPath | dict[str, list[str]] | None = Field(
        None, description="Synonyms: {term: [synonym, ...]} or a JSON/YAML file of that shape."
    )
    rate: float = Field(0.1, gt=0, le=0.5, description="Share of words changed by each swap/deletion pass.")
    n: int = Field(1, ge=1, le=10, description="Variants per question.")
    methods: list[EdaMethod] = Field(default_factory=lambda: list(EDA_METHODS))


class BalanceOp(StrictModel):
    """Oversample rare strata of a field up to a target share of the train split."""

    op: Literal["balance"]
    field: str = Field(..., description="Row field whose values are the strata (e.g. department).")
    target_share: float = Field(..., gt=0, lt=1, description="Each stratum is raised to at least this share.")
    max_factor: float = Field(5.0, ge=1, description="A stratum grows to at most this many times its size.")


AugmentOp = Annotated[
    RecordsToDialogueOp | SyntheticQAOp | ParaphraseOp | BackTranslateOp | LexicalOp | BalanceOp,
    Field(discriminator="op"),
]


class AugmentConfig(StrictModel):
    """Data augmentation and synthesis, applied to the train split only (rows get `origin: synthetic/<op>`)."""

    enabled: bool = True
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="Model used by generator ops.")
    cache_dir: ConfigPath | None = Field(
        None, description="Generation cache (by input hash); default: <run>/data/augment_cache."
    )
    seed: int | None = Field(None, description="Seed of the random choices (default: the project seed).")
    ops: list[AugmentOp] = Field(default_factory=list, description="Operations, applied in order.")
    judge: JudgeConfig | None = Field(
        None,
        description="LLM-as-judge + validators (JSON schema, regex, groundedness, PII) on the rows of synthetic_qa, "
        "paraphrase, back_translate and lexical; rejected rows go to quarantine with score and reason "
        "(domaintune.annotate.judge).",
    )
