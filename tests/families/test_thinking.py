"""`model.thinking` (on | off | keep) on reasoning-model templates: rendered prompts, loss masks, eval scoring and
the server's `reasoning_content` (non-streamed and streamed, through the official openai client)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.llamacpp.families import QWEN3_TEMPLATE

from domaintune.errors import UserError
from domaintune.model.thinking import ReasoningSplitter, answer_text, split_reasoning

USER = {"role": "user", "content": "What helps a fever?"}
REPLY = {"role": "assistant", "content": "<think>\nFever means fluids.\n</think>\n\nRest and fluids."}


def _tokenizer(model_dir: Path, mode: str | None, template: str | None = None):
    from transformers import AutoTokenizer

    from domaintune.model.loader import apply_chat_template_setting

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    apply_chat_template_setting(tokenizer, template, source=str(model_dir), thinking=mode)
    return tokenizer


def _trained_text(tokenizer, messages) -> tuple[str, str]:
    """(the text training feeds, the part of it that is in the loss)."""
    from domaintune.train.dataset import IGNORE_INDEX, encode_messages

    ids, labels, _ = encode_messages(tokenizer, messages, 512)
    return tokenizer.decode(ids), tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


PROMPT = "<|im_start|>user\nWhat helps a fever?<|im_end|>\n<|im_start|>assistant\n"
EXPECTED = {
    # mode: (generation prompt, trained text after the prompt, tokens in the loss)
    "keep": (
        PROMPT,
        "<think>\nFever means fluids.\n</think>\n\nRest and fluids.<|im_end|>",
        "<think>\nFever means fluids.\n</think>\n\nRest and fluids.<|im_end|>",
    ),
    "on": (
        PROMPT,
        "<think>\nFever means fluids.\n</think>\n\nRest and fluids.<|im_end|>",
        "Rest and fluids.<|im_end|>",
    ),
    "off": (
        PROMPT + "<think>\n\n</think>\n\n",
        "<think>\n\n</think>\n\nRest and fluids.<|im_end|>",
        "Rest and fluids.<|im_end|>",
    ),
}


def _check_mode(model_dir: Path, mode: str, template: str | None = None) -> None:
    tokenizer = _tokenizer(model_dir, mode, template)
    prompt, text, trained = EXPECTED[mode]
    assert tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True) == prompt
    fed, learned = _trained_text(tokenizer, [USER, REPLY])
    assert fed == PROMPT + text
    assert learned == trained


@pytest.mark.parametrize("mode", ["keep", "on", "off"])
def test_thinking_modes_render_and_mask_on_the_qwen3_template(mode, tiny_model_dir):
    """Fast: Qwen3's official template on the tiny Llama's ChatML tokenizer (the same rendered text)."""
    _check_mode(tiny_model_dir, mode, QWEN3_TEMPLATE)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keep", "on", "off"])
def test_thinking_modes_render_and_mask_on_the_tiny_qwen3(mode, family_model):
    """The tiny Qwen3 (Qwen's real vocabulary; built once, minutes on a fresh machine)."""
    _check_mode(family_model("qwen3"), mode)


def test_thinking_setting_is_stored_in_the_template_and_replaced_not_stacked(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from domaintune.model.thinking import thinking_mode

    tokenizer = _tokenizer(tiny_model_dir, "off", QWEN3_TEMPLATE)
    tokenizer.save_pretrained(tmp_path / "model")
    stored = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert thinking_mode(stored.chat_template) == "off"
    # What eval and serving render from the stored model: the non-thinking prompt, without the config.
    assert stored.apply_chat_template([USER], tokenize=False, add_generation_prompt=True).endswith("</think>\n\n")
    # A caller can still switch it per request, as with the model's own template.
    on = stored.apply_chat_template([USER], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == PROMPT
    again = _tokenizer(tmp_path / "model", "keep")
    assert thinking_mode(again.chat_template) == "keep"
    assert again.chat_template.count("domaintune model.thinking") == 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_thinking_on_a_template_without_the_switch_is_a_config_error(family, family_model):
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import load_tokenizer

    model_dir = family_model(family)
    with pytest.raises(UserError, match=r"model\.thinking: 'on' is set, but the chat template .* no thinking switch"):
        load_tokenizer(ModelConfig(name_or_path=str(model_dir), thinking="on"))
    load_tokenizer(ModelConfig(name_or_path=str(model_dir)))  # unset: no check, no change


def test_bad_thinking_value_names_the_field(tmp_path):
    from domaintune.config import config_from_dict

    with pytest.raises(Exception, match=r"thinking"):
        config_from_dict({"name": "t", "output_dir": str(tmp_path), "model": {"thinking": "maybe"}})


# ---- the answer after the block ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,inside,expected",
    [
        ("<think>\nplan\n</think>\n\nanswer", False, ("plan", "answer")),
        ("  <think>a\n\n</think>answer <b>", False, ("a", "answer <b>")),
        ("no block here", False, (None, "no block here")),
        ("answer <think>x</think> later", False, (None, "answer <think>x</think> later")),
        ("\nplan\n</think>\n\nanswer", True, ("plan", "answer")),
        ("<think>\ncut off by max_tokens", False, ("cut off by max_tokens", "")),
        ("<think>\n\n</think>\n\n", False, ("", "")),
        ("<thi", False, (None, "<thi")),
    ],
)
def test_split_reasoning_and_streamed_pieces_agree(text, inside, expected):
    assert split_reasoning(text, inside) == expected
    for size in (1, 2, 3, 7):  # any cut of the stream gives the same reasoning and answer
        splitter = ReasoningSplitter(inside)
        thought, answer = "", ""
        for i in range(0, len(text), size):
            r, a = splitter.feed(text[i : i + size])
            thought, answer = thought + r, answer + a
        r, a = splitter.finish()
        assert (thought + r, answer + a) == (expected[0] or "", expected[1]), size


def test_eval_scores_the_answer_after_the_block():
    from domaintune.eval.items import Item
    from domaintune.eval.runner import _score_set

    item = Item(id="1", prompt=[USER], reference="<think>\nwhy\n</think>\n\nRest and fluids.")
    answers = {"tuned": [{"prediction": "<think>\nlong reasoning that differs\n</think>\n\nRest and fluids."}]}
    ecfg = SimpleNamespace(metrics=["exact_match", "bleu"])
    per_item, aggregate = _score_set([item], answers, ecfg, None)  # type: ignore[arg-type]
    assert per_item["tuned"][0]["exact_match"] == 100.0
    assert aggregate["tuned"]["bleu_corpus"] == pytest.approx(100.0)
    assert answer_text("<think>x</think>\n\nRest.") == "Rest."


# ---- the server: reasoning_content beside content ------------------------------------------------------
THOUGHT, ANSWER = "small talk", "Hello there!"


def _scripted_model(tiny_model_dir: Path, folder: Path) -> Path:
    """A one-layer Llama with the tiny model's tokenizer plus `<think>`/`</think>` tokens (as Qwen3 has them) and
    Qwen3's template (model.thinking: keep) that greedily answers with a think block and an answer.

    Its layers add nothing (zero output projections), so the next token depends on the current one only: a bigram
    table written into the embeddings and the output head spells the scripted reply after the generation prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(tiny_model_dir, "keep", QWEN3_TEMPLATE)
    tokenizer.add_tokens(["<think>", "</think>"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    reply = tokenizer(f"<think>{THOUGHT}</think>{ANSWER}", add_special_tokens=False).input_ids
    chain = [prompt[-1], *reply, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), "the scripted reply needs distinct tokens"
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.zero_()
        for i, (token, following) in enumerate(itertools.pairwise(chain)):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[following, i] = 20.0
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory, tiny_model_dir):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state
    from serve_helpers import serve_config

    root = tmp_path_factory.mktemp("reasoning")
    model_dir = _scripted_model(tiny_model_dir, root / "reasoner")
    cfg = serve_config(root / "run", model={"name_or_path": str(model_dir)})
    state = build_state(cfg)
    key = state.store.create_key("alice")[1]
    with BackgroundServer(state) as srv:
        srv.key, srv.model = key, model_dir.name
        yield srv


def test_server_returns_reasoning_content_apart_from_content(reasoning_server):
    from openai import OpenAI

    client = OpenAI(base_url=reasoning_server.url + "/v1", api_key=reasoning_server.key, max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40)  # type: ignore[arg-type]
    message = r.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra is not None and message.model_extra["reasoning_content"] == THOUGHT
    chunks = list(
        client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40, stream=True)  # type: ignore[arg-type]
    )
    thought = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (thought, answer) == (THOUGHT, ANSWER)
    # No delta carries both, and the reasoning comes first.
    kinds = [
        "r" if (c.choices[0].delta.model_extra or {}).get("reasoning_content") else "c"
        for c in chunks
        if c.choices and ((c.choices[0].delta.model_extra or {}).get("reasoning_content") or c.choices[0].delta.content)
    ]
    assert kinds == sorted(kinds, reverse=True) and kinds[0] == "r" and kinds[-1] == "c"
