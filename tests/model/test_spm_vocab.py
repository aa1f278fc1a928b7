"""A SentencePiece tokenizer.model rebuilt from a GGUF's vocabulary, carried beside derived folders, and the token
types llama.cpp's converter cannot read put back (`domaintune.model.spm_vocab`, `domaintune.llamacpp.vocab`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from domaintune.model.spm_vocab import TOKENIZER_MODEL, carry_tokenizer_model, piece_count, write_tokenizer_model

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
WORDS = ["th", "at", "the", "▁c", "▁cat", "▁", "t", "h", "e", "c", "a", "头", "痛"]


def spm_vocab(words: list[str] = WORDS) -> tuple[list[str], list[float], list[int]]:
    """A Gemma-like vocabulary: specials, a user-defined run of two spaces and a newline, byte pieces, words."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "  ", "\n"] + [f"<0x{b:02X}>" for b in range(256)] + words
    scores = [-1000.0] * 6 + [0.0] * 256 + [-float(i) for i in range(len(words))]
    types = [CONTROL] * 4 + [USER_DEFINED] * 2 + [BYTE] * 256 + [NORMAL] * len(words)
    return tokens, scores, types


def write_gguf(path: Path, tokens, scores, types, model: str = "llama") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tokenizer_model_holds_the_gguf_vocabulary(tmp_path):
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    tokens, scores, types = spm_vocab()
    assert write_tokenizer_model(write_gguf(tmp_path / "v.gguf", tokens, scores, types), tmp_path)
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((tmp_path / TOKENIZER_MODEL).read_bytes())
    assert [p.piece for p in proto.pieces] == tokens
    assert [p.score for p in proto.pieces] == scores
    # SentencePiece needs an UNKNOWN piece: the unknown token's is the one type that differs from the GGUF's.
    assert [p.type for p in proto.pieces] == [*types[:3], UNKNOWN, *types[4:]]
    assert proto.trainer_spec.model_type == spm_pb2.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert not proto.normalizer_spec.add_dummy_prefix  # tokenizer.ggml.add_space_prefix: false
    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(tmp_path / TOKENIZER_MODEL))
    assert (processor.bos_id(), processor.eos_id(), processor.unk_id(), processor.pad_id()) == (2, 1, 3, 0)
    assert processor.encode("the cat", out_type=str) == ["the", "▁cat"]  # BPE merges by score, no dummy prefix
    assert processor.encode("头Z", out_type=str) == ["头", "<0x5A>"]  # a character outside the vocabulary: bytes
    assert processor.decode(processor.encode("头痛 Zebra")) == "头痛 Zebra"


def test_other_vocabularies_get_no_tokenizer_model(tmp_path):
    tokens, scores, types = spm_vocab()
    assert not write_tokenizer_model(write_gguf(tmp_path / "g.gguf", tokens, scores, types, model="gpt2"), tmp_path)
    no_bytes = [t for t, k in zip(tokens, types) if k != BYTE]
    kinds = [k for k in types if k != BYTE]
    assert not write_tokenizer_model(write_gguf(tmp_path / "n.gguf", no_bytes, [0.0] * len(kinds), kinds), tmp_path)
    assert not (tmp_path / TOKENIZER_MODEL).exists()


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_carry_copies_only_a_matching_vocabulary(tmp_path, caplog):
    tokens, scores, types = spm_vocab()
    source, dest = tmp_path / "src", tmp_path / "dest"
    source.mkdir()
    dest.mkdir()
    write_tokenizer_model(write_gguf(tmp_path / "v.gguf", tokens, scores, types), source)
    assert piece_count(source / TOKENIZER_MODEL) == len(tokens)
    assert carry_tokenizer_model(dest, _Sized(len(tokens)), [None, tmp_path / "nothing", source]) is not None
    assert (dest / TOKENIZER_MODEL).read_bytes() == (source / TOKENIZER_MODEL).read_bytes()
    (dest / TOKENIZER_MODEL).unlink()
    with caplog.at_level(logging.WARNING):
        assert carry_tokenizer_model(dest, _Sized(len(tokens) + 1), [source]) is None  # a grown tokenizer
    assert not (dest / TOKENIZER_MODEL).exists() and "not copied" in caplog.text


def _converted_types(tmp_path: Path, config: dict) -> list[int]:
    """What llama.cpp's converter writes from a transformers 5 folder (user-defined NORMAL, <unk> UNKNOWN),
    after `restore_token_types`."""
    from gguf import GGUFReader

    from domaintune.llamacpp.vocab import restore_token_types

    tokens, scores, types = spm_vocab()
    folder = tmp_path / "hf"
    folder.mkdir()
    write_tokenizer_model(write_gguf(tmp_path / "orig.gguf", tokens, scores, types), folder)
    added = [{"id": i, "content": tokens[i], "special": True} for i in range(4)]
    added.append({"id": 5, "content": "\n", "special": False})
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    converted = [UNKNOWN if i == 3 else NORMAL if t == USER_DEFINED else t for i, t in enumerate(types)]
    gguf_path = write_gguf(tmp_path / "converted.gguf", tokens, scores, converted)
    restore_token_types(folder, gguf_path)
    assert restore_token_types(folder, gguf_path) == 0  # idempotent
    return [int(t) for t in GGUFReader(str(gguf_path)).fields["tokenizer.ggml.token_type"].contents()]


def test_restore_token_types_gives_back_the_original_types(tmp_path):
    assert _converted_types(tmp_path, {"tokenizer_class": "GemmaTokenizer"}) == spm_vocab()[2]


def test_restore_leaves_added_tokens_to_the_converter_when_it_read_them(tmp_path):
    # A transformers 4 folder: the converter applied added_tokens_decoder itself; only user-defined pieces change.
    types = _converted_types(tmp_path, {"added_tokens_decoder": {}})
    assert types[3] == UNKNOWN and types[4:6] == [USER_DEFINED, USER_DEFINED]


def test_restore_needs_a_tokenizer_model(tmp_path):
    from domaintune.llamacpp.vocab import restore_token_types

    tokens, scores, types = spm_vocab()
    assert restore_token_types(tmp_path, write_gguf(tmp_path / "v.gguf", tokens, scores, types)) == 0


def test_gemma3_cache_without_tokenizer_model_is_upgraded_from_the_package(monkeypatch, tmp_path):
    """A folder dequantised before tokenizer.model existed gets it from the package's GGUF, nothing reconverted."""
    from domaintune.model import loader
    from domaintune.model.config import ModelConfig

    tokens, scores, types = spm_vocab()
    calls = []

    class FakePackage:
        @staticmethod
        def assemble(output_path, overwrite):
            calls.append(output_path)
            return write_gguf(Path(output_path), tokens, scores, types)

    monkeypatch.setattr(loader, "_gemma3_package", lambda: FakePackage)
    monkeypatch.setattr(loader, "_convert_gguf_once", lambda *a, **k: pytest.fail("reconverted"))
    folder = tmp_path / "gemma3-270m"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"weights")
    cfg = ModelConfig(name_or_path="gemma3-270m", cache_dir=str(tmp_path))
    assert loader.resolve_model_dir(cfg) == folder
    assert piece_count(folder / TOKENIZER_MODEL) == len(tokens)
    assert loader.resolve_model_dir(cfg) == folder and len(calls) == 1  # upgraded once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]  # the joined GGUF removed


def test_merged_export_folder_carries_the_base_tokenizer_model(tiny_model_dir, tmp_path):
    """export's merged folder gets tokenizer.model from the trained folder, else from an adapter's base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.export.runner import _save_merged
    from domaintune.model.loader import tokenizer_model_sources

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens, scores, types = spm_vocab([f"w{i}" for i in range(len(tokenizer) - 262)])
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    write_tokenizer_model(write_gguf(tmp_path / "v.gguf", tokens, scores, types), base)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}), encoding="utf-8")
    assert tokenizer_model_sources(adapter) == [adapter, base]
    assert tokenizer_model_sources(base) == [base]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = _save_merged(model, tokenizer, tmp_path / "merged", "float32", adapter)
    assert (merged / TOKENIZER_MODEL).read_bytes() == (base / TOKENIZER_MODEL).read_bytes()
    assert (merged / "model.safetensors").is_file()
