"""The `eval:` section: which models to compare, on which data, with which metrics and gates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from domaintune.hardware.autoselect import ThreadCount
from domaintune.train.preference.config import VerifierSpec
from domaintune.utils.config_types import ConfigPath, StrictModel

ALL_METRICS = (
    "rouge",
    "bleu",
    "chrf",
    "exact_match",
    "token_f1",
    "classification",
    "json",
    "perplexity",
    "term_coverage",
    "latency",
    "judge",
)


class DecodingConfig(StrictModel):
    max_new_tokens: int = Field(128, ge=1, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (the default); above 0 samples with `seed`.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling cut-off (sampling only).")
    repetition_penalty: float = Field(1.0, gt=0.0, description="1.0 = none. Same for every model compared.")
    seed: int | None = Field(None, description="Sampling seed. Default: the project `seed`.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together (left padding) per local model.")
    max_prompt_tokens: int = Field(1536, ge=16, description="Longer prompts keep their last tokens.")


class ModelSpec(StrictModel):
    """An extra model to compare: a local folder (merged/exported/full or adapter) or an OpenAI-compatible endpoint."""

    name: str = Field(..., description="Label in the report (unique; `base` and `tuned` are taken).")
    path: ConfigPath | None = Field(None, description="Local model folder (full model, merged model or PEFT adapter).")
    url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://localhost:8000/v1.")
    model: str | None = Field(None, description="Model id sent to the endpoint (default: `name`).")
    api_key: str | None = Field(None, description="API key for the endpoint (prefer `api_key_env`).")
    api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's API key.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout for an endpoint.")
    cache: bool = Field(True, description="Reuse cached answers for an endpoint (keyed by URL + model id).")

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSpec:
        if (self.path is None) == (self.url is None):
            raise ValueError(f"model {self.name!r}: give exactly one of `path` (local folder) or `url` (endpoint)")
        if self.name in ("base", "tuned"):
            raise ValueError(f"model name {self.name!r} is reserved; pick another label")
        return self


class JudgeConfig(StrictModel):
    url: str | None = Field(None, description="OpenAI-compatible base URL of the judge. Unset = judge skipped.")
    model: str = Field("gpt-4o-mini", description="Judge model id sent to the endpoint.")
    api_key: str | None = Field(None, description="API key (prefer `api_key_env`).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Environment variable holding the judge's key.")
    rubric: str = Field(
        "Score the ANSWER to the QUESTION from 1 (wrong, unsafe or unhelpful) to 5 (correct, complete, safe and "
        "clear), using the REFERENCE as a guide to the expected content.",
        description="Rubric text placed in the judge prompt.",
    )
    max_items: int | None = Field(None, ge=1, description="Judge at most this many test items per model.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout for the judge.")


Perturbation = Literal["typo", "width", "whitespace"]


def _every_perturbation() -> list[Perturbation]:
    return ["typo", "width", "whitespace"]


class RobustnessConfig(StrictModel):
    enabled: bool = Field(True, description="Re-ask perturbed test prompts and report the score drop.")
    max_items: int = Field(20, ge=1, description="Test items perturbed (the first N of the evaluated items).")
    perturbations: list[Perturbation] = Field(
        default_factory=_every_perturbation,
        description="typo: swap/drop/duplicate characters; width: full/half-width swaps; whitespace: extra spaces.",
    )
    rate: float = Field(0.05, gt=0, le=0.5, description="Share of characters a typo perturbation touches.")
    models: list[str] | None = Field(
        None, description="Models re-asked on the perturbed prompts. Default: base and tuned (those evaluated)."
    )


class ReviewConfig(StrictModel):
    n_items: int = Field(30, ge=1, description="Items exported for blind review.")
    model_a: str = Field("base", description="First model of the pair shown to reviewers.")
    model_b: str = Field("tuned", description="Second model of the pair shown to reviewers.")
    show_reference: bool = Field(False, description="Show the reference answer to reviewers too.")


class ConcentrationConfig(StrictModel):
    """The template-learning alarm: a gain over base that comes from a few items or from one stratum."""

    enabled: bool = Field(True, description="Check every set's gain (primary metric, each model - base).")
    gain_share: float = Field(
        0.5, gt=0, lt=1, description="Share of the total gain (sum of per-item deltas) that counts as 'most of it'."
    )
    max_item_share: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="The alarm sounds when over `gain_share` of the gain comes from under this share of the items "
        "(the fewest largest-gain items are counted, and listed).",
    )
    stratum_gain_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="The alarm also sounds when one stratum (eval.stratum_field) brings over this share of the "
        "total gain ...",
    )
    max_stratum_item_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="... while holding at most this share of the items (a large stratum naturally brings much of "
        "the gain; at the defaults, a stratum of at most a quarter of the items bringing over half the gain).",
    )


class EvalSetConfig(StrictModel):
    """One named evaluation set: scored by every model, with its own metrics, deltas, intervals, alarm and gates."""

    name: str = Field(
        ...,
        description="The set's name in the report and in gates (`sets.<name>.rougeL_char_delta_ci_low > 0`). "
        "`test` is the data stage's test split and `general` the retention set unless `file` says otherwise.",
    )
    file: ConfigPath | None = Field(
        None,
        description="JSONL rows (messages, alpaca instruction/input/output or sharegpt conversations) or a CSV "
        "file with instruction[,input],output columns. Default: `test` -> eval.test_file or data/test.jsonl; "
        "`general` -> the retention set (eval.general_file); other names -> data/holdout_<name>.jsonl written by "
        "data.split.holdout_group (`<name>_dev` -> data/holdout_<name>_dev.jsonl, its dev_rows: the set to "
        "choose recipes on, kind out_of_source).",
    )
    kind: Literal["in_distribution", "out_of_source", "retention"] | None = Field(
        None,
        description="What the set measures (shown in the report). retention: the tuned/base ratio is reported and "
        "a file that train.replay trains on is refused. Default: test -> in_distribution, general -> retention, "
        "else out_of_source.",
    )
    max_items: int | None = Field(
        None,
        ge=1,
        description="Evaluate only the first N items of this set. Default: eval.max_items for `test`, "
        "eval.max_general_items for `general`, every row otherwise (a data-stage holdout is sized by "
        "data.split.holdout_group.max_rows).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", value):
            raise ValueError(f"set name {value!r}: use letters, digits and _ (it is part of gate names)")
        return value


class EvalConfig(StrictModel):
    test_file: ConfigPath | None = Field(None, description="Domain test set. Default: `<output_dir>/data/test.jsonl`.")
    general_file: ConfigPath | None = Field(
        None,
        description=(
            "General set for retention. Default: `<output_dir>/data/general_holdout.jsonl` (tasks the data stage "
            "held out of the replay pool), else `<output_dir>/data/general.jsonl`; skipped when neither exists. "
            "A file that `train.replay` also trains on is refused: retention must be measured on unseen rows."
        ),
    )
    allow_overlap: bool = Field(
        False,
        description=(
            "Before scoring, eval checks every test prompt against the data that trained the model (the run's "
            "`data/train.jsonl`, and the replay pool when `train.replay` is on): a test prompt seen in training, "
            "exactly or as a near duplicate, fails the stage with the overlapping ids. true: score anyway and "
            "mark the report as contaminated."
        ),
    )
    overlap_near_threshold: float = Field(
        0.85,
        gt=0,
        le=1,
        description="MinHash Jaccard from which a test prompt counts as a near duplicate of a training prompt.",
    )
    sets: list[EvalSetConfig] | None = Field(
        None,
        description=(
            "The named sets scored side by side, each with its metrics, deltas with bootstrap intervals, "
            "concentration alarm and gates. Default: `test`, every data/holdout_<name>.jsonl the data stage wrote "
            "(data.split.holdout_group, and its dev_rows as `<name>_dev`; kind out_of_source), and `general` (retention) when there is one. "
            "report.json: `sets.<name>.{file,kind,n_items,metrics.<model>.<metric>,deltas.<model>.<metric>.{delta,"
            "ci_low,ci_high,base,model,n},concentration.<model>,retention.<model>,contamination}`. Gates: "
            "`sets.<name>.<metric>_delta[_ci_low|_ci_high]` (tuned - base), `sets.<name>.<model>.<metric>`, "
            "`sets.<name>.retention`, `sets.<name>.gain_concentrated` (1 when the alarm sounds); un-prefixed names "
            "(`rougeL_char_delta_ci_low`) keep meaning the `test` set. Robustness and the judge run on `test`. "
            "Every set is checked against the training data (see allow_overlap)."
        ),
    )
    max_items: int | None = Field(None, ge=1, description="Evaluate only the first N test items (CPU budgets).")
    max_general_items: int | None = Field(None, ge=1, description="Evaluate only the first N general items.")
    base: bool = Field(True, description="Evaluate the base model (`model:` section).")
    tuned: bool = Field(True, description="Evaluate the tuned model (`<output_dir>/model`).")
    models: list[ModelSpec] = Field(default_factory=list, description="Extra models: local folders or endpoints.")
    decoding: DecodingConfig = Field(
        default_factory=DecodingConfig, description="Decoding settings shared by every model (greedy by default)."
    )
    engine: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto",
        description=(
            "Engine generating the answers of local models (base, tuned, eval.models paths), the same for all "
            "of them. llamacpp: each model as a q8_0 GGUF (the tuned adapter merged first), several sequences "
            "decoded together on the CPU. auto: llama.cpp on a CPU-only machine when llama-cpp-python is "
            "installed, else transformers. Reference perplexity: eval.perplexity_engine. The report names the "
            "engine and why it was chosen."
        ),
    )
    engine_check_items: int = Field(
        8,
        ge=0,
        description="With llamacpp: the first N test items are also answered by transformers (greedy, cached); "
        "the report gives identical answers, prefix agreement and the primary metric under both engines. 0: no check.",
    )
    metrics: list[Literal[ALL_METRICS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(ALL_METRICS),
        description="Metrics computed; `judge` runs only when `judge.url` is set.",
    )
    system_prompt: str | None = Field(
        None, description="System message prepended to prompts that have none (same for every model)."
    )
    glossary: ConfigPath | None = Field(None, description="Domain terms, one per line, for term coverage.")
    stratum_field: str | None = Field(
        None, description="Row field for the per-stratum breakdown. Default: the first of department/qtype/category."
    )
    primary_metric: str = Field("rougeL_char", description="Metric used for worst cases, robustness and retention.")
    gates: list[str] = Field(
        default_factory=list,
        description="Pass/fail rules such as `rougeL_char_delta >= 2`, `retention >= 0.95` or "
        "`sets.out_of_source.rougeL_char_delta_ci_low > 0` (names: eval.sets); eval exits 1 on failure.",
    )
    perplexity_max_tokens: int = Field(2048, ge=16, description="Prompt + reference tokens scored for perplexity.")
    perplexity_engine: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto",
        description="Who scores the reference answers' perplexity, the same for every local model. auto: the engine "
        "that answers — with llama.cpp each reference is scored by the q8_0 GGUF on the cached prompt of its answer "
        "(the prompt processed once for answer and score; the answers unchanged), else transformers. transformers: a separate pass in "
        "eval.perplexity_precision. The report gives, on the engine-check items, both engines' perplexity.",
    )
    perplexity_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Precision of transformers' reference-perplexity passes, the same for every model. bf16: the layers "
        "under bf16 autocast, the output projection and log-softmax in fp32. auto: bf16 where the hardware "
        "does bf16 natively (AVX-512-BF16/AMX CPUs, bf16 GPUs), else fp32. The report says which and why.",
    )
    num_threads: ThreadCount = Field(
        "auto",
        description="torch CPU threads while evaluating. auto (or null): one per physical core this process may use "
        "(affinity, SMT siblings and cgroup quota considered).",
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples for the delta CIs.")
    concentration: ConcentrationConfig = Field(
        default_factory=ConcentrationConfig,
        description="Template-learning alarm: flags a gain concentrated in few items or one stratum, lists them "
        "and reports the gain without them.",
    )
    worst_n: int = Field(10, ge=0, description="Worst items listed in the error analysis.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Optional LLM-as-judge (skipped without url).")
    robustness: RobustnessConfig = Field(
        default_factory=RobustnessConfig, description="Score drop on lightly perturbed prompts."
    )
    review: ReviewConfig = Field(
        default_factory=ReviewConfig, description="Defaults of `domaintune eval export-review`."
    )
    verifiers: list[VerifierSpec] | None = Field(
        None,
        description="Domain verifiers scored on every model's test answers (the same definitions as "
        "train.grpo.rewards; see docs/preference-tuning.md): pass rate (every component at its pass_at) with a 95% "
        "Wilson interval, mean combined reward and per-component means, and each model - base with a paired "
        "bootstrap interval. Gates: `verifier_pass_rate_delta_ci_low > 0`, `tuned.verifier_pass_rate >= 0.8`, "
        "`verifier_reward_delta`. Default: train.grpo.rewards when train.method is grpo, else none; [] turns "
        "them off.",
    )
    reward_model: ConfigPath | None = Field(
        None,
        description="A `method: reward` run's model/ folder that scores every model's test answers (its logit): "
        "mean per model and each model - base with a paired bootstrap interval (gates `reward_model_score_delta`, "
        "`reward_model_score_delta_ci_low`, `tuned.reward_model_score`). Default: train.ppo.reward_model when "
        "train.method is ppo, else none.",
    )

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, gates: list[str]) -> list[str]:
        from domaintune.eval.gates import parse_gate

        for gate in gates:
            parse_gate(gate)  # raises ValueError with the bad rule named
        return gates

    @field_validator("primary_metric")
    @classmethod
    def _primary_is_text_metric(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"rouge[12L]_(char|word)|bleu|chrf|exact_match|token_f1", value):
            raise ValueError(
                f"{value!r} is not a per-item text metric: use rouge1/rouge2/rougeL with _char or _word, "
                "bleu, chrf, exact_match or token_f1"
            )
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval.models: duplicate names {dupes}")
        set_names = [s.name for s in self.sets or []]
        if len(set(set_names)) != len(set_names):
            raise ValueError(f"eval.sets: duplicate names {sorted({n for n in set_names if set_names.count(n) > 1})}")
        if self.sets is not None and "test" not in set_names:
            raise ValueError(
                "eval.sets must list `test` (the in-distribution split: robustness, the judge, the worst cases and "
                "the un-prefixed gate names use it)"
            )
        known = set(names) | {"base", "tuned"}
        unknown = sorted(set(self.robustness.models or []) - known)
        if unknown:
            raise ValueError(f"eval.robustness.models: unknown model(s) {unknown}; known: {sorted(known)}")
        return self
