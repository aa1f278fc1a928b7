"""GRPO's verifier rewards, one by one and combined, on hand-made completions (no model)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from domaintune.errors import UserError
from domaintune.train.preference.config import VerifierSpec
from domaintune.train.preference.scoring import score_answers
from domaintune.train.preference.stats import paired_bootstrap, wilson_interval
from domaintune.train.preference.verifiers import build_verifiers, combined_scores, passes, score_components

PROMPT = [{"role": "user", "content": "What is your return policy?"}]


def score(spec: dict, completions: list, **fields) -> list[float]:
    (verifier,) = build_verifiers([VerifierSpec(**spec)])
    return verifier([PROMPT] * len(completions), completions, **fields)


def test_answer_match_exact_numeric_and_contains():
    refs = {"reference": ["30 days.", "30 days.", "30 days."]}
    assert score({"type": "answer_match"}, ["30 Days", "thirty days", "30 days!"], **refs) == [1.0, 0.0, 1.0]
    numeric = {"type": "answer_match", "mode": "numeric", "tolerance": 0.01}
    assert score(numeric, ["The total is 1,234.50", "about 1234.6", "none"], reference=["1234.5"] * 3) == [
        1.0,
        0.0,
        0.0,
    ]
    contains = {"type": "answer_match", "mode": "contains", "field": "gold"}
    assert score(contains, ["Yes: within 30 days of delivery.", "no"], gold=["30 days", "30 days"]) == [1.0, 0.0]


def test_conversational_completions_are_read_as_their_text():
    completion = [{"role": "assistant", "content": "Returns within 30 days."}]
    assert score({"type": "regex", "pattern": r"\b30 days\b"}, [completion]) == [1.0]


def test_regex_and_phrases():
    assert score({"type": "regex", "pattern": r"\b30[- ]?days?\b"}, ["30-day window", "3 days", "30 DAYS"]) == [
        1.0,
        0.0,
        1.0,
    ]
    assert score({"type": "regex", "pattern": "DAYS", "case_sensitive": True}, ["30 days"]) == [0.0]
    phrases = {"type": "phrases", "phrases": ["30 days", "prepaid label"]}
    assert score(phrases, ["30 days with a prepaid label", "30 days only"]) == [1.0, 0.0]
    assert score({**phrases, "require_all": False}, ["30 days only"]) == [0.5]


def test_applies_if_skips_prompts_it_does_not_concern():
    (verifier,) = build_verifiers([VerifierSpec(type="regex", pattern="30 days", applies_if="return")])
    shipping = [{"role": "user", "content": "How long is shipping?"}]
    assert verifier([PROMPT, shipping, PROMPT], ["no", "no", "within 30 days"]) == [0.0, 1.0, 1.0]


def test_json_schema_validity():
    schema = {"type": "object", "required": ["order_id"], "properties": {"order_id": {"type": "integer"}}}
    spec = {"type": "json_schema", "schema": schema}
    texts = ['{"order_id": 12}', 'Sure: ```json\n{"order_id": 7}\n```', '{"order_id": "x"}', "no json", "{broken"]
    assert score(spec, texts) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_glossary_coverage_of_the_terms_the_reference_uses(tmp_path):
    glossary = tmp_path / "terms.txt"
    glossary.write_text("prepaid label\nstore credit\nrestocking fee\n", encoding="utf-8")
    spec = {"type": "glossary", "glossary_path": str(glossary)}
    ref = "Start the return to get a prepaid label, or choose store credit."
    got = score(spec, ["Use the prepaid label.", "Use the Prepaid Label or store credit."], reference=[ref, ref])
    assert got == [0.5, 1.0]
    assert score(spec, ["restocking fee applies"], reference=["nothing relevant"]) == [pytest.approx(1 / 3)]


def test_reference_facts_are_the_figures_the_reference_states_in_any_spelling():
    spec = {"type": "reference_facts"}
    ref = "Returns are free within 30 days; the refund follows in 3-5 business days. Orders over $75 ship free."
    answers = [
        "You have 30 days to return it; refunds take 3–5 business days and shipping is free over 75 dollars.",
        "There is a 30-day window; the refund takes 3 to 5 days.",  # one of three facts
        "Please contact us.",
    ]
    assert score(spec, answers, reference=[ref] * 3) == [1.0, pytest.approx(1 / 3), 0.0]
    # A reference without figures is not this verifier's business; Chinese units count as facts too.
    assert score(spec, ["Sure."], reference=["Please log in first."]) == [1.0]
    assert score(
        spec, ["退货期为30天，3到5个工作日退款。", "请联系客服。"], reference=["30天内可退货，3-5个工作日退款。"] * 2
    ) == [
        1.0,
        0.0,
    ]
    # Its pass rate where it applies counts only rows whose reference states a figure.
    (verifier,) = build_verifiers([VerifierSpec(**spec)])
    rows = [{"prompt": PROMPT, "reference": ref}, {"prompt": PROMPT, "reference": "Log in first."}]
    result = score_answers([verifier], rows, ["Within 30 days.", "Log in."])
    assert result["component_applicable"] == {"reference_facts": 1}
    assert result["component_pass_rate_where_applicable"] == {"reference_facts": 0.0}


def test_length_window():
    spec = {"type": "length", "min_words": 4, "max_words": 8}
    assert score(spec, ["one two", "one two three four five", " ".join(["w"] * 12), " ".join(["w"] * 20)]) == [
        0.5,
        1.0,
        0.5,
        0.0,
    ]


def test_no_pii():
    got = score(
        {"type": "no_pii"},
        ["Call us any time.", "Call me at +1 415 555 0134.", "Mail jane.doe@example.com", "See www.shop.example"],
    )
    assert got == [1.0, 0.0, 0.0, 1.0]


def shout_reward(prompts, completions, **fields):
    return [float(c.isupper()) for c in completions]


def test_python_function_by_import_path():
    spec = {"type": "python", "function": "test_verifiers:shout_reward"}
    assert score(spec, ["YES", "no"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="cannot import"):
        score({"type": "python", "function": "no_such_module:f"}, ["x"])


class _Judge(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        verdict = "9" if "30 days" in prompt.split("Answer to score:")[1] else "2 out of 10"
        reply = {"choices": [{"message": {"role": "assistant", "content": verdict}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_judge_through_an_openai_compatible_endpoint_on_loopback():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        spec = {"type": "llm_judge", "endpoint": url, "model": "judge", "pass_at": 0.7}
        assert score(spec, ["within 30 days", "whenever"], reference=["30 days"] * 2) == [0.9, 0.2]
    finally:
        server.shutdown()
    dead = {"type": "llm_judge", "endpoint": url, "model": "judge", "timeout_s": 2}
    assert score(dead, ["x"]) == [0.0]  # an unreachable judge scores 0 (logged), never crashes training


def test_components_combine_with_weights_and_pass_rates():
    specs = [
        VerifierSpec(type="regex", name="window", pattern="30 days", weight=2.0),
        VerifierSpec(type="no_pii", weight=1.0),
        VerifierSpec(type="length", min_words=2, max_words=10, weight=0.5, pass_at=1.0),
    ]
    verifiers = build_verifiers(specs)
    answers = ["Within 30 days.", "Call +1 415 555 0134 within 30 days.", "No."]
    components = score_components(verifiers, [PROMPT] * 3, answers)
    assert combined_scores(verifiers, components) == [3.5, 2.5, 1.25]
    assert passes(verifiers, components) == [True, False, False]
    result = score_answers(verifiers, [{"prompt": PROMPT}] * 3, answers)
    assert result["pass_rate"] == pytest.approx(1 / 3) and result["components"]["window"] == pytest.approx(2 / 3)
    low, high = result["pass_rate_ci95"]
    assert 0.0 < low < 1 / 3 < high < 1.0


def test_repeated_types_get_numbered_names_and_config_errors_are_clear():
    names = [v.__name__ for v in build_verifiers([VerifierSpec(type="no_pii"), VerifierSpec(type="no_pii")])]
    assert names == ["no_pii", "no_pii_2"]
    with pytest.raises(ValueError, match="needs pattern"):
        VerifierSpec(type="regex")
    with pytest.raises(ValueError, match="needs endpoint, model"):
        VerifierSpec(type="llm_judge")


def test_intervals():
    assert wilson_interval(0, 0) == (None, None)
    low, high = wilson_interval(9, 10)
    assert 0.55 < low < 0.9 < high <= 1.0
    boot = paired_bootstrap([0, 0, 1, 0], [1, 1, 1, 0])
    assert boot["delta"] == 0.5 and boot["ci95"][0] <= 0.5 <= boot["ci95"][1]
