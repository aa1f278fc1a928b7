"""`repetition_penalty` through the real server and the official openai client (`extra_body`, as with vLLM):
a greedy answer is token for token what the eval's engines give on the same prompt - transformers'
`generate(do_sample=False, repetition_penalty=...)`, and llama.cpp's `Decoder` over the same GGUF -
with `serve.default_repetition_penalty` when the request gives none, and a 400 naming the field below 0.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from serve_helpers import make_tiny_adapter, serve_config

# Prompts on which the tiny random model's greedy answer changes under a penalty of 1.05 (checked below).
COMPLETION = "Hello, how are you?"
CHAT = "The patient has a fever of 39 degrees and a cough"
MAX_TOKENS = 40
EOT = [2]  # the tiny model's <|im_end|>: end_of_turn_token_ids


def _start(tmp_path_factory, tiny_model_dir, engine: str):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    root = tmp_path_factory.mktemp(f"serve_penalty_{engine}")
    make_tiny_adapter(tiny_model_dir, root / "adapter-a", seed=1)
    models = [{"name": "med-a", "source": str(root / "adapter-a")}]
    section = {"engine": engine, "models": models, "default_repetition_penalty": 1.05, "default_temperature": 0.0}
    state = build_state(serve_config(root / "run", section))
    assert state.engine.name == engine
    key = state.store.create_key("alice")[1]
    srv = BackgroundServer(state)
    srv.key = key
    srv.root = root
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with _start(tmp_path_factory, tiny_model_dir, "transformers") as srv:
        yield srv


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.engines.llamacpp import llamacpp_unavailable_reason

    reason = llamacpp_unavailable_reason()
    if reason:
        pytest.skip(f"llama.cpp cannot run here: {reason}")
    with _start(tmp_path_factory, tiny_model_dir, "llamacpp") as srv:
        yield srv


def _client(srv) -> OpenAI:
    return OpenAI(base_url=srv.url + "/v1", api_key=srv.key, max_retries=0)


def _ask(srv, kind: str, penalty: float | None, model: str = "tiny-random-llama") -> str:
    extra = {} if penalty is None else {"extra_body": {"repetition_penalty": penalty}}
    c = _client(srv)
    if kind == "chat":
        messages = [{"role": "user", "content": CHAT}]
        r = c.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, **extra)
        return r.choices[0].message.content or ""
    return (
        c.completions.create(model=model, prompt=COMPLETION, max_tokens=MAX_TOKENS, temperature=0, **extra)
        .choices[0]
        .text
    )


def _prompt_ids(tokenizer, kind: str) -> list[int]:
    """The prompt ids the server builds (serve/generation.py `_prompt`)."""
    if kind == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(COMPLETION)["input_ids"]


def _text(tokenizer, tokens: list[int]) -> str:
    cut = next((i for i, t in enumerate(tokens) if t in EOT), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def _hf_answer(tiny_model_dir, kind: str, penalty: float, adapter=None) -> str:
    """transformers' own greedy `generate` with the penalty, on the prompt alone (the eval's transformers engine)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = _prompt_ids(tokenizer, kind)
    with torch.inference_mode():
        out = model.eval().generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            repetition_penalty=penalty,
            max_new_tokens=MAX_TOKENS,
            eos_token_id=EOT,
            pad_token_id=EOT[0],
        )
    return _text(tokenizer, out[0, len(ids) :].tolist())


def _llamacpp_answer(gguf, tiny_model_dir, kind: str, penalty: float) -> str:
    """The eval's llama.cpp engine on the same GGUF: `Decoder` and `Sampling(repetition_penalty=...)`."""
    from transformers import AutoTokenizer

    from domaintune.llamacpp.generate import Decoder, Sampling, generate
    from domaintune.llamacpp.runtime import GGUFModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = GGUFModel(gguf)
    decoder = Decoder(model, stop_ids=EOT, n_seq=1, seq_ctx=256)
    try:
        seq = generate(decoder, [_prompt_ids(tokenizer, kind)], Sampling(MAX_TOKENS, repetition_penalty=penalty))[0]
    finally:
        decoder.close()
        model.close()
    return _text(tokenizer, seq.tokens)


def test_greedy_answers_with_a_penalty_are_transformers_generate(server, tiny_model_dir):
    expected = {p: _hf_answer(tiny_model_dir, "completion", p) for p in (1.0, 1.05)}
    assert expected[1.0] != expected[1.05]  # the penalty changes this answer: the comparison means something
    assert _ask(server, "completion", 1.05) == expected[1.05]
    assert _ask(server, "completion", 1.0) == expected[1.0]
    assert _ask(server, "completion", None) == expected[1.05]  # serve.default_repetition_penalty
    adapter = server.root / "adapter-a"
    tuned = {p: _hf_answer(tiny_model_dir, "chat", p, adapter) for p in (1.0, 1.05)}
    assert tuned[1.0] != tuned[1.05]
    assert _ask(server, "chat", 1.05, model="med-a") == tuned[1.05]
    assert _ask(server, "chat", None, model="med-a") == tuned[1.05]
    assert _ask(server, "chat", 1.0, model="med-a") == tuned[1.0]


def test_each_row_of_a_batch_has_its_own_penalty(server, tiny_model_dir):
    """Rows of one batch (left-padded prompts, base and adapter mixed) each decode with their own penalty, over
    their own prompt and answer: each answer is `generate` on its prompt alone."""
    adapter = server.root / "adapter-a"
    asks = [
        ("completion", 1.0, "tiny-random-llama"),
        ("completion", 1.05, "tiny-random-llama"),
        ("chat", 1.05, "tiny-random-llama"),
        ("chat", 1.05, "med-a"),
        ("chat", 1.0, "med-a"),
    ] * 2
    expected = {
        ask: _hf_answer(tiny_model_dir, ask[0], ask[1], adapter if ask[2] == "med-a" else None) for ask in set(asks)
    }
    before = server.state.engine.batches_run
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: _ask(server, *ask), asks))
    assert answers == [expected[ask] for ask in asks]
    assert server.state.engine.batches_run - before < len(asks)  # some of them did share a batch


@pytest.mark.parametrize("bad", [0, -1.05])
def test_a_penalty_not_above_zero_is_a_400_naming_the_field(server, bad):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(server, "completion", bad)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "repetition_penalty"
    assert "repetition_penalty" in err.value.body["message"]


def test_llamacpp_greedy_answers_with_a_penalty_are_the_evals(llama_server, tiny_model_dir):
    from domaintune.llamacpp.cache import gguf_for, merged_adapter

    gguf = gguf_for(tiny_model_dir, "q8_0")  # what the engine serves and the eval's llama.cpp engine reads
    expected = {p: _llamacpp_answer(gguf, tiny_model_dir, "completion", p) for p in (1.0, 1.05)}
    assert expected[1.0] != expected[1.05]
    assert _ask(llama_server, "completion", 1.05) == expected[1.05]
    assert _ask(llama_server, "completion", None) == expected[1.05]
    assert _ask(llama_server, "completion", 1.0) == expected[1.0]
    tuned_gguf = gguf_for(merged_adapter(llama_server.root / "adapter-a", tiny_model_dir), "q8_0")
    tuned = _llamacpp_answer(tuned_gguf, tiny_model_dir, "chat", 1.05)
    assert _ask(llama_server, "chat", 1.05, model="med-a") == tuned
