"""A SentencePiece `tokenizer.model` rebuilt from a GGUF's vocabulary, and carried beside derived model folders.

transformers' GGUF loader turns a SentencePiece GGUF (`tokenizer.ggml.model: llama`, e.g. Gemma 3) into a
`tokenizer.json` only. Without `tokenizer.model`, llama.cpp's converter (`convert_hf_to_gguf.py`, Gemma 3's
`set_vocab`) reads that folder as GPT-2-style BPE, so its GGUF no longer tokenizes like the model (characters
outside the vocabulary come back as `<0x..>` text). With it, the converter takes its SentencePiece path
(`_create_vocab_sentencepiece`: pieces, scores and types by id), which gives back the original GGUF's
vocabulary: the proto written here holds the GGUF's tokens, scores and token types as they are (SentencePiece
and GGUF number the types alike), a BPE model with byte fallback. One difference is forced by SentencePiece,
which needs an UNKNOWN piece: the unknown token (Gemma's `<unk>`, id 3, CONTROL in Google's GGUF) is UNKNOWN.

transformers (5.x) neither reads nor saves `tokenizer.model`, so every folder written from such a model
(train output, merged adapters, export) copies it from its source (`carry_tokenizer_model`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.utils.io import atomic_write

log = logging.getLogger(__name__)

TOKENIZER_MODEL = "tokenizer.model"
_BYTE = 6  # GGUF and SentencePiece token type: a byte-fallback piece <0xNN>
_UNKNOWN = 2
_SPECIAL_IDS = {"unk": "unknown_token_id", "bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def sentencepiece_proto_from_gguf(gguf_path: Path) -> bytes | None:
    """The serialized SentencePiece ModelProto of a SentencePiece GGUF; None for other vocabularies (GPT-2 BPE...)."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    reader = GGUFReader(str(gguf_path))
    if _field(reader, "tokenizer.ggml.model") != "llama":
        return None
    tokens, scores, types = (
        _field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type")
    )  # fmt: skip
    if not tokens or scores is None or types is None or not len(tokens) == len(scores) == len(types):
        raise UserError(f"{gguf_path}: tokenizer.ggml.tokens/scores/token_type are missing or of unequal length")
    if _BYTE not in types:
        return None  # no byte fallback: not the kind of vocabulary this rebuilds
    special = {name: _field(reader, f"tokenizer.ggml.{key}") for name, key in _SPECIAL_IDS.items()}
    if special["unk"] is None:
        raise UserError(f"{gguf_path}: a SentencePiece vocabulary without tokenizer.ggml.unknown_token_id")
    proto = spm_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    for index, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if not piece:
            raise UserError(f"{gguf_path}: tokenizer.ggml.tokens[{index}] is empty")
        proto.pieces.add(piece=piece, score=float(score), type=_UNKNOWN if index == special["unk"] else int(kind))
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE  # type: ignore[attr-defined]
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    for name, token_id in special.items():
        setattr(trainer, f"{name}_id", -1 if token_id is None else int(token_id))
        if token_id is not None:
            setattr(trainer, f"{name}_piece", tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"  # the GGUF stores pieces already normalized; llama.cpp applies none either
    normalizer.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def write_tokenizer_model(gguf_path: Path, folder: Path) -> bool:
    """Write `folder/tokenizer.model` from a SentencePiece GGUF; False (nothing written) for other vocabularies."""
    data = sentencepiece_proto_from_gguf(gguf_path)
    if data is None:
        return False
    target = Path(folder) / TOKENIZER_MODEL
    with atomic_write(target, "wb") as handle:
        handle.write(data)
    target.chmod(0o644)  # like the files transformers writes beside it
    return True


def piece_count(path: Path) -> int:
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(path))
    return int(processor.GetPieceSize())


def carry_tokenizer_model(dest: Path, tokenizer: Any, sources: Iterable[Path | None]) -> Path | None:
    """Copy the first `tokenizer.model` found in `sources` into `dest` when it holds the tokenizer's vocabulary
    (same size: a tokenizer grown by added tokens would be cut back to the old one by the converter)."""
    for source in sources:
        if source is None or not (Path(source) / TOKENIZER_MODEL).is_file():
            continue
        path = Path(source) / TOKENIZER_MODEL
        pieces = piece_count(path)
        if pieces != len(tokenizer):
            log.warning(
                "%s holds %d pieces but the tokenizer saved in %s has %d tokens: not copied; llama.cpp's converter "
                "reads that folder's tokenizer.json instead",
                path, pieces, dest, len(tokenizer),
            )  # fmt: skip
            return None
        target = Path(dest) / TOKENIZER_MODEL
        shutil.copyfile(path, target)
        return target
    return None
