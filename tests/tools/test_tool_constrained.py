"""Constrained decoding under `tool_choice: required` and a named function, through the real server and the official
openai client. The tiny random Llama (ChatML tool template) writes garbage when left free, so a parseable call
whose arguments validate against the tool's schema is the constraint's doing; under `auto` it still writes
garbage. The transformers engine here; the same checks on the llama.cpp engine (GGUF conversion) with -m slow."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest
from openai import OpenAI

from serve_helpers import serve_config
from tool_helpers import RETURN_POLICY

SHIP = {
    "type": "function",
    "function": {
        "name": "ship_parcel",
        "description": "Ship an order's parcel.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "maxLength": 6},
                "express": {"type": "boolean"},
                "boxes": {"type": "integer", "minimum": 1, "maximum": 9},
                "carrier": {"type": "string", "enum": ["dhl", "ups", "fedex"]},
                "note": {"type": "object", "properties": {"fragile": {"type": "boolean"}}, "required": ["fragile"]},
            },
            "required": ["order_id", "express", "boxes", "carrier"],
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "opening_hours", "description": "The shop's opening hours."}}
TOOLS = [SHIP, RETURN_POLICY, NO_ARGS]
ASK = [{"role": "user", "content": "Please ship order A1001 by express, two boxes."}]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


def _start(tmp_path_factory, tiny_model_dir, engine: str):
    from transformers import AutoTokenizer

    from domaintune.model.tools import CHATML_TOOLS_TEMPLATE
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    root = tmp_path_factory.mktemp(f"serve_constrained_{engine}")
    model_dir = root / "tiny-tools"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    tok.save_pretrained(model_dir)
    section = {"engine": engine, "max_context_tokens": 1024, "max_tokens_cap": 256, "max_body_bytes": 50_000}
    state = build_state(serve_config(root / "run", section, model={"name_or_path": str(model_dir)}))
    assert state.engine.name == engine
    srv = BackgroundServer(state)
    srv.key = state.store.create_key("alice")[1]
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


def _model(c: OpenAI) -> str:
    return c.models.list().data[0].id


def _call(choice) -> tuple[str, dict]:
    """The one call of a constrained answer, its arguments checked against its tool's schema."""
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return call.function.name, arguments


def _required_gives_valid_calls(srv) -> None:
    c = _client(srv)
    model = _model(c)
    names = set()
    for seed, temperature in ((1, 0.0), (2, 1.0), (3, 1.0), (4, 1.5)):
        r = c.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice="required", seed=seed, temperature=temperature,
            max_tokens=256,
        )  # fmt: skip
        name, arguments = _call(r.choices[0])
        names.add(name)
        if name == "ship_parcel":
            assert set(arguments) <= set(SCHEMAS[name]["properties"])  # no invented keys
    assert names <= {"ship_parcel", "return_policy", "opening_hours"}


def _named_gives_that_function(srv) -> None:
    c = _client(srv)
    model = _model(c)
    for name, seed in (("ship_parcel", 5), ("ship_parcel", 6), ("return_policy", 5), ("opening_hours", 5)):
        choice = {"type": "function", "function": {"name": name}}
        r = c.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed, temperature=1.0, max_tokens=256
        )
        called, arguments = _call(r.choices[0])
        assert called == name
        if name == "opening_hours":
            assert arguments == {}  # no parameters: an empty object, nothing invented


def test_required_gives_a_call_whose_arguments_validate(server):
    _required_gives_valid_calls(server)


def test_a_named_function_gives_a_call_to_it(server):
    _named_gives_that_function(server)


def test_auto_is_unconstrained(server):
    """Under `auto` (and with tool_choice omitted) the random model's greedy answer is the same garbage prose,
    no call; under `required` the same prompt gives a call."""
    c = _client(server)
    model = _model(c)
    answers = []
    for extra in ({"tool_choice": "auto"}, {}):
        r = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=48, **extra)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")
        answers.append(r.choices[0].message.content)
    assert answers[0] == answers[1] and answers[0]
    assert not answers[0].lstrip().startswith(("<tool_call>", "{"))
    forced = c.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=256
    )
    _call(forced.choices[0])


def test_streamed_required_call_and_a_call_cut_by_max_tokens(server):
    c = _client(server)
    model = _model(c)
    named = {"type": "function", "function": {"name": "ship_parcel"}}
    chunks = list(
        c.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice=named, seed=7, temperature=1.0, max_tokens=256,
            stream=True,
        )
    )  # fmt: skip
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["ship_parcel"]
    jsonschema.validate(json.loads(deltas[0].function.arguments), SCHEMAS["ship_parcel"])
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    # too few tokens for the whole call: finish_reason length and the partial call as content, as OpenAI does
    r = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named, seed=7, max_tokens=6)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("<tool_call>")


def test_parameters_llguidance_cannot_compile_are_a_400(server):
    import openai

    c = _client(server)
    bad = {"type": "function", "function": {"name": "odd", "parameters": {"type": "object", "$ref": "#/nowhere"}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=_model(c), messages=ASK, tools=[bad], tool_choice="required", max_tokens=8)
    assert e.value.param == "tools" and "cannot constrain decoding" in e.value.message


@pytest.mark.slow
def test_required_and_named_on_llamacpp(llama_server):
    _required_gives_valid_calls(llama_server)
    _named_gives_that_function(llama_server)
