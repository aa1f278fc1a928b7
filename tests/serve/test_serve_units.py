"""Small pieces of the serve stage: engine choice, rate-limit arithmetic, streamed text, config checks."""

from __future__ import annotations

import pytest

from domaintune.config import ConfigError, config_from_dict
from domaintune.errors import UserError
from domaintune.serve.engines import choose_engine, vllm_unavailable_reason
from domaintune.serve.engines.transformers import IncrementalText
from domaintune.serve.limits import LimitExceeded, MemoryLimits, Quota


def test_engine_choice_is_explicit_about_vllm():
    reason = vllm_unavailable_reason()
    if reason is None:
        pytest.skip("vLLM can run here; the CPU-only branch is not reachable")
    name, why = choose_engine("auto")
    assert name in ("transformers", "llamacpp") and reason in why  # llama.cpp on the CPU when it is installed
    with pytest.raises(UserError, match="vLLM cannot run here"):
        choose_engine("vllm")
    assert choose_engine("transformers")[0] == "transformers"


def test_limits_reserve_settle_and_retry_after():
    now = [1000.0]
    limits = MemoryLimits(lambda key_id, day: 0, clock=lambda: now[0])
    rpm = Quota("k", rpm=2)
    limits.admit(rpm, 0)
    limits.admit(rpm, 0)
    now[0] += 20
    with pytest.raises(LimitExceeded) as over:
        limits.admit(rpm, 0)
    assert over.value.retry_after_s == 40  # the first request leaves the window at t+60
    now[0] += 40
    limits.admit(rpm, 0)

    tpm = Quota("t", tpm=100)
    first = limits.admit(tpm, 60)  # reserved: prompt + max_tokens
    limits.settle(first, 50)  # used 50: 10 refunded
    now[0] += 15
    limits.admit(tpm, 30)
    with pytest.raises(LimitExceeded) as over:
        limits.admit(tpm, 21)  # 80 used or reserved + 21 > 100
    assert over.value.retry_after_s == 45 and "80 of 100" in over.value.message
    with pytest.raises(LimitExceeded, match="more than the key's limit"):
        limits.admit(tpm, 101)
    limits.admit(Quota("free"), 10**9)  # no limits: always admitted


def test_daily_quota_reserves_and_refunds_and_starts_from_the_store():
    limits = MemoryLimits(lambda key_id, day: 70)  # 70 tokens already used today, per the store
    daily = Quota("d", daily=100)
    with pytest.raises(LimitExceeded) as over:
        limits.admit(daily, 31)
    assert over.value.code == "daily_quota_exceeded" and "only 30" in over.value.message
    held = limits.admit(daily, 30)
    with pytest.raises(LimitExceeded):
        limits.admit(daily, 1)  # everything left is reserved
    limits.settle(held, 10)  # 20 refunded
    limits.admit(daily, 20)
    with pytest.raises(LimitExceeded) as over:
        limits.admit(daily, 1)
    assert "exhausted" in over.value.message and over.value.retry_after_s > 0
    released = limits.admit(Quota("r", rpm=1, daily=100), 0)
    limits.release(released)  # a request refused after admission gives its slot back
    limits.admit(Quota("r", rpm=1, daily=100), 0)


class _CharTokenizer:
    """Token id = a byte; decoding shows half of a multi-byte character as U+FFFD, like real tokenizers."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, token):  # no tool-call marker tokens in this vocabulary
        return None

    def convert_ids_to_tokens(self, token_id):
        return chr(token_id)


def test_streamed_text_holds_back_partial_characters_and_stop_prefixes():
    text = IncrementalText(_CharTokenizer(), stop=["END"])
    pieces = []
    for b in "héllo E".encode():
        assert not text.add(b)
        pieces.append(text.piece(final=False))
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == "héllo"  # " E" is held back: it may start the stop string
    assert not text.add(ord("x"))
    assert text.piece(final=False) == " "  # "Ex" cannot start "END" any more... up to the hold length
    for b in b"END tail":
        if text.add(b):
            break
    assert text.text == "héllo ExEND"[: "héllo ExEND".find("END")]
    assert "".join(pieces) + " " + text.piece(final=True) == "héllo Ex"


def test_serve_config_errors_name_the_field():
    base = {"name": "x", "model": {"name_or_path": "tiny-random-llama"}}
    with pytest.raises(ConfigError, match=r"serve\.canary"):
        config_from_dict(
            {
                **base,
                "serve": {"canary": {"model": "m", "stable": "a", "candidate": "b", "window": 10, "min_requests": 20}},
            }
        )
    with pytest.raises(ConfigError, match="duplicate names"):
        config_from_dict({**base, "serve": {"models": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}})
    with pytest.raises(ConfigError, match="max_tokens_cap"):
        config_from_dict({**base, "serve": {"default_max_tokens": 500, "max_tokens_cap": 100}})
    with pytest.raises(ConfigError, match=r"serve\.engine"):
        config_from_dict({**base, "serve": {"engine": "tensorrt"}})


def test_batches_group_similar_prompt_lengths_within_the_token_budget():
    import asyncio

    from domaintune.serve.engines import GenRequest, SamplingParams
    from domaintune.serve.engines.transformers import select_batch

    loop = asyncio.new_event_loop()

    def req(n, backbone="b"):
        return GenRequest(f"r{n}", backbone, None, [1] * n, SamplingParams(max_tokens=4), loop, asyncio.Queue())

    try:
        pending = [req(40), req(1000), req(45), req(38, "other"), req(300), req(42), req(39)]
        batch = select_batch(pending, max_batch_size=8, max_batch_tokens=400)
        assert [len(r.prompt_ids) for r in batch] == [40, 39, 42, 45]  # oldest first, then closest lengths
        assert len(select_batch(pending, max_batch_size=2, max_batch_tokens=400)) == 2
        alone = select_batch([req(1000), req(40)], max_batch_size=8, max_batch_tokens=400)
        assert [len(r.prompt_ids) for r in alone] == [1000]  # over the budget: runs alone, never starves
    finally:
        loop.close()
