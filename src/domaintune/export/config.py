"""The `export:` section: merge, quantise, GGUF, pruning, and how the exports are checked."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from domaintune.hardware.autoselect import ThreadCount
from domaintune.utils.config_types import StrictModel

GgufType = Literal["f16", "q8_0", "q4_k_m", "q5_k_m"]


def _default_gguf_types() -> list[GgufType]:
    return ["f16", "q8_0"]


class ExportConfig(StrictModel):
    merged_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the merged safetensors model in `export/merged/`."
    )
    int8: bool = Field(True, description="Write a dynamic INT8 (torch, Linear layers) CPU model to `export/int8/`.")
    int8_exclude: list[str] = Field(
        default_factory=lambda: ["lm_head", "down_proj"],
        description=(
            "Linear layers (name or name suffix) kept in float in the INT8 model. down_proj's inputs carry "
            "activation outliers that per-tensor dynamic activation quantisation destroys (SmolLM2-135M: val "
            "perplexity 12.7 -> 43.9 with every layer quantised, 13.8 with down_proj kept in float)."
        ),
    )
    bitsandbytes: list[Literal["4bit", "8bit"]] = Field(
        default_factory=list,
        description="GPU only: also write bitsandbytes 4-/8-bit models (`export/bnb-4bit/`, ...). Needs CUDA.",
    )
    gguf: list[GgufType] = Field(
        default_factory=_default_gguf_types,
        description=(
            "GGUF files built by llama.cpp (its converter, then its quantiser) in `export/gguf/`: f16, q8_0, "
            "q4_k_m, q5_k_m. Any architecture llama.cpp's converter supports. Empty: none."
        ),
    )
    verify_gguf: bool = Field(
        True,
        description=(
            "Verify each GGUF where users run it: loaded by llama.cpp, teacher-forced top-1 agreement, perplexity "
            "and greedy answers on val rows against the merged model, the chat template rendered through llama.cpp, "
            "the end-of-turn stop."
        ),
    )
    gguf_tolerance: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Largest relative perplexity change (GGUF in llama.cpp vs the merged model) per type; defaults: "
            "f16 0.01, q8_0 0.03, q5_k_m 0.10, q4_k_m 0.20. A GGUF beyond it is reported as failed and removed."
        ),
    )
    merge_tolerance: float = Field(
        1e-3, description="Largest absolute logit difference allowed between base+adapter and the merged model."
    )
    modelfile: bool = Field(True, description="Write an Ollama `Modelfile` beside the GGUF files.")
    modelfile_gguf: GgufType = Field("q8_0", description="Which GGUF file the Modelfile's FROM points at.")
    ollama_template: str | None = Field(
        None,
        description=(
            "Go template for the Modelfile's TEMPLATE. Default: translated from a ChatML, Llama-3 or Gemma chat "
            "template; any other chat template needs this (or `export.modelfile: false`), checked before export builds."
        ),
    )
    ollama_parameters: dict[str, float | int | str] = Field(
        default_factory=dict,
        description=(
            "Extra `PARAMETER name value` lines for the Modelfile (e.g. temperature; `repeat_penalty` set to "
            "eval.decoding.repetition_penalty: Ollama's default is 1.1, over the last `repeat_last_n` (64) tokens only)."
        ),
    )
    prune_sparsity: float | None = Field(
        None,
        description="Optional magnitude pruning of the merged model's Linear weights to this fraction of zeros (0-1).",
    )
    eval_rows: int = Field(
        32, ge=1, description="Rows of the val split used for the before/after perplexity of every export."
    )
    eval_max_length: int = Field(512, ge=16, description="Token limit per row for that perplexity.")
    eval_items: int = Field(
        8,
        ge=0,
        description=(
            "Test rows answered greedily by every artefact and scored with the eval stage's metric "
            "(`eval.primary_metric`, e.g. rougeL_char): the answer-quality change of each export. 0: skip."
        ),
    )
    eval_max_new_tokens: int = Field(64, ge=1, description="Token limit of those answers.")
    num_threads: ThreadCount = Field(
        "auto",
        description="torch CPU threads for the export. auto (or null): one per physical core this process may use "
        "(affinity, SMT siblings and cgroup quota considered).",
    )
    speed_prompts: int = Field(2, ge=1, description="Prompts used to time greedy generation (tokens/s).")
    speed_new_tokens: int = Field(32, ge=1, description="New tokens generated per timed prompt.")

    @field_validator("prune_sparsity")
    @classmethod
    def _sparsity_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError("must be between 0 and 1 (exclusive), e.g. 0.3 for 30% zeros")
        return value

    @field_validator("gguf")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))
