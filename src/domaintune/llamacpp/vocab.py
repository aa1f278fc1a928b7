"""Token types llama.cpp's converter leaves out of a SentencePiece GGUF, put back in place.

The converter (`_create_vocab_sentencepiece`) reads each piece's type from `tokenizer.model` but has no case for
USER_DEFINED pieces (they come out NORMAL), and takes special/user-defined added tokens from
`tokenizer_config.json`'s `added_tokens_decoder`, which transformers 5.x no longer writes (the added tokens live
in `tokenizer.json`). For Gemma 3 that turns its 165 user-defined pieces (runs of spaces, tabs and newlines,
`<b>`, `[multimodal]`...) into NORMAL ones, which llama.cpp's tokenizer then splits differently from the model's
tokenizer ("a  b" as `a ▁ ▁b`), and leaves `<unk>` UNKNOWN instead of CONTROL. This puts those types back,
by the converter's own rules, in the converted file (an int32 array rewritten in place; nothing moves).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("domaintune.llamacpp")

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # GGUF token types (the same numbers as SentencePiece's)
_SPACE = "\u2581"


def _wanted_types(model_dir: Path, tokens: list[str], types: list[int]) -> list[int]:
    """The types the converter gives when it can read every source (see the module doc)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    wanted = list(types)
    for index, piece in enumerate(proto.pieces[: len(wanted)]):
        if piece.type == USER_DEFINED and wanted[index] == NORMAL:
            wanted[index] = USER_DEFINED
    config_path, tokenizer_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if "added_tokens_decoder" in config or not tokenizer_path.is_file():
        return wanted  # the converter read the added tokens itself
    for added in json.loads(tokenizer_path.read_text(encoding="utf-8")).get("added_tokens", []):
        index, content = int(added["id"]), str(added["content"])
        if index >= len(wanted):
            continue
        if tokens[index] not in (content, content.replace(_SPACE, " ")):
            log.warning("%s: added token %d is %r in tokenizer.json but %r in the GGUF; type kept",
                        tokenizer_path, index, content, tokens[index])  # fmt: skip
            continue
        wanted[index] = CONTROL if added.get("special") else USER_DEFINED
    return wanted


def restore_token_types(model_dir: Path, gguf_path: Path) -> int:
    """Rewrite `tokenizer.ggml.token_type` of a GGUF converted from `model_dir` where the converter could not
    read the type; returns how many tokens changed (0 without `tokenizer.model` or for other vocabularies)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.model").is_file():
        return 0
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path), "r+")
    model = reader.fields.get("tokenizer.ggml.model")
    field = reader.fields.get("tokenizer.ggml.token_type")
    if model is None or model.contents() != "llama" or field is None:
        return 0
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = [int(t) for t in field.contents()]
    wanted = _wanted_types(model_dir, tokens, types)
    changed = [i for i, (have, want) in enumerate(zip(types, wanted)) if have != want]
    for index in changed:
        field.parts[field.data[index]][0] = wanted[index]
    reader.data.flush()
    if changed:
        log.info("%s: %d token types restored from %s", gguf_path, len(changed), model_dir)
    return len(changed)
