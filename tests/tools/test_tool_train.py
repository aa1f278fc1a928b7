"""Training on tool calls: the assistant's calls and answers are learned, tool results (and everything else) are
masked from the loss; a template that cannot render tools is refused, not silently used."""

from __future__ import annotations

import pytest

from domaintune.data.formats import row_tools, to_messages
from domaintune.errors import UserError
from domaintune.train.dataset import IGNORE_INDEX, encode_rows
from tool_helpers import openai_row


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The trained token ids, as their contiguous runs."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token  # a trained position predicts its own token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = trained
    return runs


def test_tool_calls_are_trained_and_tool_results_masked(qwen_tools_tokenizer):
    tok = qwen_tools_tokenizer
    row = openai_row(1, "A1001")
    row = {"messages": to_messages(row), "tools": row_tools(row)}  # as the data stage writes it
    [example], stats = encode_rows(tok, [row], max_length=2048)
    ids, labels = example["input_ids"], example["labels"]
    runs = _runs(ids, labels)
    call = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A1001"}}\n</tool_call><|im_end|>'
    answer = "Your order A1001 has shipped (answer 1).<|im_end|>"
    assert [tok.decode(r) for r in runs] == [call, answer]
    # exact masks: the two runs are these strings' own tokens, at the places the rendering puts them
    want_call = tok(call, add_special_tokens=False)["input_ids"]
    want_answer = tok(answer, add_special_tokens=False)["input_ids"]
    assert runs == [want_call, want_answer]
    text = tok.decode(ids)
    start_call = len(
        tok(text[: text.index('<tool_call>\n{"name": "lookup_order"')], add_special_tokens=False)["input_ids"]
    )
    start_answer = len(tok(text[: text.index("Your order")], add_special_tokens=False)["input_ids"])
    expected = [IGNORE_INDEX] * len(ids)
    expected[start_call : start_call + len(want_call)] = want_call
    expected[start_answer : start_answer + len(want_answer)] = want_answer
    assert labels == expected
    # the tool's result and the tool definitions are in the input, never in the loss
    trained_text = "".join(tok.decode(r) for r in runs)
    assert "shipped" in tok.decode(ids[:start_answer]) and '"status"' not in trained_text
    assert "<tool_response>" in text and "lookup_order" in text.split("<|im_start|>user")[0]
    assert stats.target_tokens == len(want_call) + len(want_answer)


def test_a_template_without_tool_support_is_refused(qwen2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_dir)  # the family fixture's template has no tool branches
    row = openai_row(1)
    row = {"messages": to_messages(row), "tools": row_tools(row)}
    with pytest.raises(UserError, match=r"row 2 .*has tool calls, but the chat template does not render"):
        encode_rows(
            tok, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, row], 512
        )
