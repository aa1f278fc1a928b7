"""The `train:` sub-sections of the preference and reinforcement methods: kto, orpo, simpo, reward, ppo, grpo.

Each family trains through an adapter method (`adapter:`; its settings come from `train.lora` etc.) on rows
from a JSONL file whose default is what `domaintune feedback export` or the data stage writes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from domaintune.utils.config_types import ConfigPath, StrictModel

AdapterMethod = Literal["full", "lora", "dora", "qlora", "ia3"]

PAIRS_HELP = (
    "JSONL of preference pairs: `prompt` (text or messages), `chosen`, `rejected` (text or messages); "
    "LLaMA-Factory's (`instruction`/`input` + `chosen`/`rejected`, or `conversations` + `chosen`/`rejected`) and "
    "TRL's implicit-prompt layout (`chosen`/`rejected` full chats) are read too. Default: the pairs "
    "`domaintune feedback export` writes, <serve.feedback_dir or output_dir/feedback>/preference.jsonl."
)
VAL_HELP = "Held-out rows; default: 10% of `path` (at least one)."
ADAPTER_HELP = "The method this trains through (adapter settings come from their own sections)."


class KTOSettings(StrictModel):
    path: ConfigPath | None = Field(
        None,
        description=(
            "JSONL of unpaired rows: `prompt` (text or messages), `completion` (text or messages), `label` "
            "(true: desirable, false: undesirable; `desirable` and `rating` > 0 are read as well). Default: the rows "
            "`domaintune feedback export` writes from thumbs up/down, <feedback dir>/unpaired.jsonl."
        ),
    )
    val_path: ConfigPath | None = Field(None, description=VAL_HELP)
    adapter: AdapterMethod = Field("lora", description=ADAPTER_HELP)
    beta: float = Field(0.1, gt=0.0, description="KTO beta (strength of the anchor to the reference model).")
    desirable_weight: float = Field(
        1.0, gt=0.0, description="Loss weight of desirable rows (raise it when thumbs-down rows outnumber thumbs-up)."
    )
    undesirable_weight: float = Field(1.0, gt=0.0, description="Loss weight of undesirable rows.")


class ORPOSettings(StrictModel):
    path: ConfigPath | None = Field(None, description=PAIRS_HELP)
    val_path: ConfigPath | None = Field(None, description=VAL_HELP)
    adapter: AdapterMethod = Field("lora", description=ADAPTER_HELP)
    beta: float = Field(0.1, gt=0.0, description="ORPO lambda: weight of the odds-ratio term beside the SFT loss.")


class SimPOSettings(StrictModel):
    path: ConfigPath | None = Field(None, description=PAIRS_HELP)
    val_path: ConfigPath | None = Field(None, description=VAL_HELP)
    adapter: AdapterMethod = Field("lora", description=ADAPTER_HELP)
    loss_type: Literal["simpo", "sigmoid", "hinge", "ipo"] = Field(
        "simpo",
        description="simpo: SimPO (length-normalised, reference-free); sigmoid/hinge/ipo: CPO with that loss.",
    )
    beta: float = Field(2.0, gt=0.0, description="Reward scale (SimPO's beta; CPO's beta for the other losses).")
    gamma: float = Field(0.5, ge=0.0, description="SimPO's target reward margin (gamma / beta in trl's terms).")
    cpo_alpha: float = Field(0.0, ge=0.0, description="Weight of the SFT term on the chosen answer (0: pure SimPO).")


class RewardSettings(StrictModel):
    path: ConfigPath | None = Field(None, description=PAIRS_HELP)
    val_path: ConfigPath | None = Field(
        None, description="Held-out pairs for the pairwise accuracy; default: 10% of `path` (at least one)."
    )
    adapter: Literal["full", "lora"] = Field(
        "lora",
        description=(
            "Train the whole model or a LoRA adapter (plus the new score head) as a sequence classifier. The "
            "model is `model.name_or_path`: point it at a smaller model to get a small reward model."
        ),
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Pull the mean reward towards 0 (trl's centring term); None: off."
    )


VerifierType = Literal[
    "answer_match", "regex", "phrases", "json_schema", "glossary", "reference_facts", "length", "no_pii", "llm_judge",
    "reward_model", "python",
]  # fmt: skip


class VerifierSpec(StrictModel):
    """One reward component of GRPO: a verifier that scores each completion in [0, 1] (reward model: its logit)."""

    type: VerifierType = Field(..., description="Which verifier (docs/preference-tuning.md lists their fields).")
    name: str | None = Field(
        None, description="Name in the logs and reports; default: the type (numbered if repeated)."
    )
    weight: float = Field(1.0, description="Weight of this component in the summed reward.")
    pass_at: float = Field(
        1.0, description="A completion passes this verifier when its score is at least this (the pass-rate figures)."
    )
    applies_if: str | None = Field(
        None,
        description=(
            "A regular expression searched (case-insensitively) in the prompt: where it does not match, this "
            "component does not apply and scores 1 (e.g. the return-window check only on questions about returns)."
        ),
    )
    field: str = Field(
        "reference", description="answer_match: the row field with the reference answer (data-stage rows: the answer)."
    )
    mode: Literal["exact", "numeric", "contains"] = Field(
        "exact",
        description="answer_match: normalised equality, the last number within `tolerance`, or reference contained.",
    )
    tolerance: float = Field(1e-6, ge=0.0, description="answer_match numeric: absolute tolerance.")
    pattern: str | None = Field(
        None,
        description=(
            "regex: a Python regular expression searched in the completion. reference_facts: the expression that "
            "finds a fact (default: a figure with its unit, e.g. `30 days`, `3-5 business days`, `$75`, `2小时`)."
        ),
    )
    phrases: list[str] = Field(default_factory=list, description="phrases: phrases the completion must contain.")
    case_sensitive: bool = Field(False, description="regex / phrases / glossary: match case.")
    require_all: bool = Field(
        True, description="phrases: score 1 only when all are present (else: the fraction present)."
    )
    schema_: dict[str, Any] | ConfigPath | None = Field(
        None, alias="schema", description="json_schema: a JSON schema (inline, or a .json file)."
    )
    terms: list[str] = Field(default_factory=list, description="glossary: domain terms the answer should use.")
    glossary_path: ConfigPath | None = Field(None, description="glossary: a file of terms, one per line.")
    min_words: int = Field(0, ge=0, description="length: fewest words for full reward.")
    max_words: int = Field(10_000, ge=1, description="length: most words for full reward (decays linearly beyond).")
    endpoint: str | None = Field(None, description="llm_judge: an OpenAI-compatible base URL (…/v1).")
    model: str | None = Field(None, description="llm_judge: the judge model's name at the endpoint.")
    api_key_env: str | None = Field(None, description="llm_judge: environment variable holding the API key.")
    rubric: str = Field(
        "Is the answer correct, helpful and consistent with the reference?",
        description="llm_judge: what the judge scores (it answers 0-10, scaled to 0-1).",
    )
    timeout_s: float = Field(30.0, gt=0, description="llm_judge: seconds per request.")
    reward_model: ConfigPath | None = Field(None, description="reward_model: a `method: reward` run's model/ folder.")
    function: str | None = Field(
        None, description="python: `package.module:function` called as f(prompts, completions, **row_fields) -> scores."
    )

    @model_validator(mode="after")
    def _needs(self) -> VerifierSpec:
        needed = {
            "regex": ("pattern",),
            "llm_judge": ("endpoint", "model"),
            "reward_model": ("reward_model",),
            "python": ("function",),
        }.get(self.type, ())
        missing = [key for key in needed if getattr(self, key) is None]
        if self.type == "json_schema" and self.schema_ is None:
            missing.append("schema")
        if self.type == "phrases" and not self.phrases:
            missing.append("phrases")
        if self.type == "glossary" and not (self.terms or self.glossary_path):
            missing.append("terms or glossary_path")
        if missing:
            raise ValueError(f"verifier `{self.type}` needs {', '.join(missing)}")
        if self.min_words > self.max_words:
            raise ValueError("length: min_words is above max_words")
        return self


class GenerationSettings(StrictModel):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(64, ge=1, description="Tokens generated per completion.")
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    beta: float = Field(
        0.04, ge=0.0, description="KL coefficient against the reference (the start model: base, or init_from's)."
    )
    epsilon: float = Field(0.2, gt=0.0, description="Clip range of the policy ratio.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each batch of completions.")
    prompts_path: ConfigPath | None = Field(
        None,
        description=(
            "JSONL of prompt rows (`prompt` text or messages, plus any fields the verifiers read). Default: the data "
            "stage's data/train.jsonl, each row's chat up to its last answer as the prompt and that answer as "
            "`reference`."
        ),
    )
    val_prompts_path: ConfigPath | None = Field(
        None, description="Held-out prompt rows for the pass rate; default: data/test.jsonl (as above)."
    )


class GRPOSettings(GenerationSettings):
    adapter: AdapterMethod = Field("lora", description=ADAPTER_HELP)
    rewards: list[VerifierSpec] = Field(
        default_factory=list, description="Reward components, summed with their weights (at least one)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's reward std (group), the batch's, or not (none)."
    )
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field("dapo", description="trl's GRPO loss variant.")


class PPOSettings(GenerationSettings):
    adapter: AdapterMethod = Field("lora", description=ADAPTER_HELP)
    reward_model: ConfigPath = Field(..., description="The reward model: a `method: reward` run's model/ folder.")
    num_generations: int = Field(2, ge=2, description="Completions per prompt (their mean is the baseline).")
    num_iterations: int = Field(2, ge=1, description="PPO epochs over each batch of rollouts.")
    beta: float = Field(0.05, ge=0.0, description="KL coefficient against the reference (the SFT/start model).")
