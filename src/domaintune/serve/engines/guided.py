"""Constrained (guided) decoding: an answer that must follow a grammar, token by token.

`CallGrammar` is what a request asks for: one tool call written as the model's template writes calls (the text
before it, a JSON object valid against a JSON schema, the text after it), then the end of the turn. It is an
llguidance grammar (Lark syntax with an embedded `%json` schema), the library vLLM's `guidance` structured-output
backend runs, so the transformers and llama.cpp engines here and vLLM enforce the same grammar.

`Guide` is one request's matcher: before each token `allowed()` says which token ids keep the answer inside the
grammar (the engine sets every other logit to -inf before sampling), `advance()` feeds it the sampled token. Once
the grammar is complete only the end-of-turn tokens are allowed, so the answer ends there.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

# At most one space after `,` and `:` (as templates' `tojson` writes them) and none elsewhere: a model cannot pad
# a call with whitespace until it runs out of tokens.
WHITESPACE = {"whitespace_pattern": r"[ ]?"}


@dataclass(frozen=True)
class CallGrammar:
    """One call: `prefix`, a JSON object valid against `schema`, `suffix`; `lark` is the llguidance grammar for the
    tokenizer it was built with (its special tokens named by id)."""

    prefix: str
    suffix: str
    schema: dict[str, Any]
    lark: str


def _literal(text: str, special: dict[str, int]) -> list[str]:
    """Lark pieces that match `text`: its special tokens (llguidance's `<[id]>`) and quoted text between them."""
    pieces: list[str] = []
    rest = text
    while rest:
        hits = [(rest.find(t), t) for t in special if t and rest.find(t) >= 0]
        if not hits:
            pieces.append(json.dumps(rest))
            break
        at, token = min(hits, key=lambda h: (h[0], -len(h[1])))
        if at:
            pieces.append(json.dumps(rest[:at]))
        pieces.append(f"<[{special[token]}]>")
        rest = rest[at + len(token) :]
    return pieces


def call_grammar(prefix: str, suffix: str, schema: dict[str, Any], special: dict[str, int]) -> CallGrammar:
    """The grammar of one call; `special` maps the tokenizer's special tokens' text to their ids (llguidance lexes
    only plain text: a special token in the template's wrapper, Qwen's `<tool_call>`, is matched as that token)."""
    options = {**schema, "x-guidance": WHITESPACE}
    body = " ".join([*_literal(prefix, special), "call", *_literal(suffix, special)])
    lark = f"start: {body}\ncall: %json {json.dumps(options)}\n"
    return CallGrammar(prefix=prefix, suffix=suffix, schema=schema, lark=lark)


_TOKENIZERS: dict[tuple[int, tuple[int, ...]], Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any, eot_ids: list[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer (built once per tokenizer: about a second for a 150k
    vocabulary), whose end-of-sequence tokens are the model's end-of-turn tokens."""
    from llguidance.hf import from_tokenizer

    key = (id(tokenizer), tuple(eot_ids))
    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(key)
        if found is None or found[0] is not tokenizer:
            found = (tokenizer, from_tokenizer(tokenizer, eos_token=list(eot_ids)))
            _TOKENIZERS[key] = found
        return found[1]


def special_tokens(tokenizer: Any, eot_ids: list[int]) -> dict[str, int]:
    """Text -> id of the tokens llguidance treats as special (it never matches their text as plain bytes)."""
    lt = ll_tokenizer(tokenizer, eot_ids)
    added = {str(t): int(i) for t, i in tokenizer.get_added_vocab().items()}
    return {text: i for text, i in added.items() if i < lt.vocab_size and lt.is_special_token(i)}


def grammar_problem(grammar: CallGrammar, tokenizer: Any, eot_ids: list[int]) -> str | None:
    """Why llguidance cannot compile this grammar (e.g. a JSON schema keyword it does not implement); None if it can."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar.lark), ll_tokenizer(tokenizer, eot_ids))
    return error or None


class Guide:
    """One request's grammar state."""

    def __init__(self, grammar: CallGrammar, tokenizer: Any, eot_ids: list[int]):
        from llguidance import LLMatcher

        self.tokenizer = ll_tokenizer(tokenizer, eot_ids)
        self.matcher = LLMatcher(self.tokenizer, LLMatcher.grammar_from_lark(grammar.lark), log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the tool-call grammar does not compile: {self.matcher.get_error()}")

    def allowed(self, vocab_size: int) -> np.ndarray:
        """A boolean mask over `vocab_size` logits: True where the token keeps the answer inside the grammar
        (ids past the tokenizer's vocabulary, a model's padding rows, are never allowed)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self.tokenizer.vocab_size].astype(bool)
        if self.matcher.is_error():
            raise ValueError(f"constrained decoding failed: {self.matcher.get_error()}")
        if not mask.any():
            raise ValueError("constrained decoding failed: the grammar allows no next token")
        out = np.zeros(vocab_size, dtype=bool)
        n = min(vocab_size, mask.size)
        out[:n] = mask[:n]
        return out

    def advance(self, token: int) -> None:
        """Feed the sampled token; ValueError when the grammar does not allow it (the sampler ignored the mask)."""
        if not self.matcher.consume_token(int(token)):
            raise ValueError(f"token {token} breaks the tool-call grammar: {self.matcher.get_error()}")
