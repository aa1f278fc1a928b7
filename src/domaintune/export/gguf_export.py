"""Write a merged Llama-family Hugging Face folder as a GGUF file (f32 / f16 / q8_0).

The layout follows llama.cpp's `convert_hf_to_gguf.py` for the `llama` architecture:
tensor names come from gguf-py's own HF -> GGUF name map, the q/k projections are
permuted for GGML's rotary layout, 1-D tensors stay f32, and the tokenizer (a
GPT-2-style byte-level BPE) is stored as token list + types + merges, with special
token ids and the chat template read by gguf-py's `SpecialVocab`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from domaintune.errors import UserError

# The probe text llama.cpp encodes to recognise a BPE pre-tokenizer; a tokenizer's ids for
# it, hashed, identify which pre-tokenizer regex llama.cpp must use.
_PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Hashes published by llama.cpp for the pre-tokenizers of common Llama-architecture models.
_KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
}

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM"}


def detect_pre_tokenizer(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(_PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    name = _KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        raise UserError(
            f"export.gguf_tokenizer_pre: the tokenizer's BPE pre-tokenizer is not recognised (probe hash {digest[:16]}); "
            "set export.gguf_tokenizer_pre to llama.cpp's name for it (e.g. llama-bpe, gpt-2, smollm)"
        )
    return name


def _permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> GGML's interleaved pairs (the inverse of transformers' GGUF loader)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _vocab(tokenizer, vocab_size: int):
    import gguf

    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise UserError(f"tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[index]
        if index in added:
            if not added[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(
                gguf.TokenType.CONTROL if added[index].special or looks_special else gguf.TokenType.USER_DEFINED
            )
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    qtype: str = "f16",
    tokenizer_pre: str | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict:
    """Convert the HF folder `model_dir` into `out_path` (written to a temp file, then renamed)."""
    import gguf
    from transformers import AutoTokenizer

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _llama_config(model_dir)
    weight_type, file_type = _gguf_types(qtype)
    shape = _llama_shape(model_dir, config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, token_types = _vocab(tokenizer, shape.vocab_size)
    pre = tokenizer_pre or detect_pre_tokenizer(tokenizer)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hyperparameters(writer, config, shape, name or model_dir.name, file_type)
        _add_tokenizer(writer, model_dir, tokenizer, tokens, token_types, pre)
        counts = _add_tensors(writer, model_dir, config, shape, weight_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out_path), "type": qtype, "tokenizer_pre": pre, "tensors": counts}


def _llama_config(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not set(architectures) & SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{model_dir}/config.json: GGUF export supports {sorted(SUPPORTED_ARCHITECTURES)}, not {architectures}"
        )
    return config


def _gguf_types(qtype: str) -> tuple[Any, Any]:
    """(tensor type of the weight matrices, file type recorded in the header) for `qtype`."""
    import gguf

    qtypes = {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }
    if qtype not in qtypes:
        raise UserError(f"export.gguf: unknown type {qtype!r}; choose from {sorted(qtypes)}")
    return qtypes[qtype]


@dataclass(frozen=True)
class _LlamaShape:
    n_layers: int
    n_head: int
    n_kv: int
    head_dim: int
    vocab_size: int
    rope_theta: float


def _llama_shape(model_dir: Path, config: dict[str, Any]) -> _LlamaShape:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise UserError(f"{model_dir}/config.json: RoPE scaling {rope_type!r} is not supported by the GGUF export")
    n_head = config["num_attention_heads"]
    return _LlamaShape(
        n_layers=config["num_hidden_layers"],
        n_head=n_head,
        n_kv=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
        vocab_size=config["vocab_size"],
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
    )


def _add_hyperparameters(writer, config: dict[str, Any], shape: _LlamaShape, name: str, file_type: Any) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_kv)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(shape.vocab_size)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != config["hidden_size"] // shape.n_head:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, model_dir: Path, tokenizer, tokens: list[str], token_types: list[int], pre: str) -> None:
    """Byte-level BPE: token list, types and merges, special token ids and the chat template."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UserError(f"{model_dir}: tokenizer.json has no BPE merges; only byte-level BPE tokenizers are supported")
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None:
        if not tokenizer.chat_template:
            raise UserError(f"{model_dir}: the tokenizer has no chat template to store in the GGUF file")
        writer.add_chat_template(tokenizer.chat_template)


def _add_tensors(writer, model_dir: Path, config: dict[str, Any], shape: _LlamaShape, weight_type: Any) -> dict:
    """Every safetensors tensor under its GGUF name: q/k permuted for GGML's rotary layout, 1-D tensors in f32."""
    import gguf
    import torch
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.n_layers)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors weights to convert")
    counts = {"quantized": 0, "f16": 0, "f32": 0}
    tied = bool(config.get("tie_word_embeddings", False))
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                if tied and key == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                new_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise UserError(f"{file}: tensor {key} has no GGUF name for the llama architecture")
                data = handle.get_tensor(key).to(torch.float32).numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute_rotary(data, shape.n_head)
                elif key.endswith("k_proj.weight"):
                    data = _permute_rotary(data, shape.n_kv)
                if data.ndim == 1 or weight_type == gguf.GGMLQuantizationType.F32:
                    writer.add_tensor(new_name, np.ascontiguousarray(data, dtype=np.float32))
                    counts["f32"] += 1
                elif weight_type == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
                    packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(new_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                    counts["quantized"] += 1
                else:
                    writer.add_tensor(new_name, np.ascontiguousarray(data, dtype=np.float16))
                    counts["f16"] += 1
    return counts


# ---------------------------------------------------------------- Ollama Modelfile

_OLLAMA_CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_OLLAMA_LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def _default_system_prompt(tokenizer, start: str, end: str) -> str | None:
    """The system prompt a chat template inserts when the conversation has none (SmolLM2 does)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "XyZzY"}], tokenize=False)
    head = rendered.split("XyZzY", 1)[0]
    marker = f"{start}system"
    if marker not in head:
        return None
    body = head.split(marker, 1)[1]
    body = body.split(end, 1)[0]
    return body.strip("\n") or None


def ollama_modelfile(
    gguf_name: str,
    tokenizer,
    stop_tokens: list[str],
    template: str | None = None,
    parameters: dict | None = None,
    system: str | None = None,
) -> str:
    """A Modelfile whose TEMPLATE is the tokenizer's chat template in Ollama's Go-template form.

    SYSTEM is `system` when given (the training data's system prompt), else the default system
    prompt the chat template inserts by itself, if any.
    """
    chat_template = tokenizer.chat_template or ""
    default_system = None
    if template is None:
        if "<|im_start|>" in chat_template:
            template = _OLLAMA_CHATML
            default_system = _default_system_prompt(tokenizer, "<|im_start|>", "<|im_end|>")
        elif "<|start_header_id|>" in chat_template:
            template = _OLLAMA_LLAMA3
            default_system = _default_system_prompt(tokenizer, "<|start_header_id|>", "<|eot_id|>")
        else:
            raise UserError(
                "export.ollama_template: the chat template is neither ChatML nor Llama-3; "
                "give the Go template for the Modelfile in export.ollama_template"
            )
    system = system or default_system
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for token in stop_tokens:
        lines.append(f'PARAMETER stop "{token}"')
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
