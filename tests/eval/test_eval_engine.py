"""`eval.engine`: the same prompts answered by llama.cpp (batched, q8_0 GGUF) and by transformers."""

from __future__ import annotations

import functools

import pytest

from domaintune.errors import UserError

PROMPTS = [[{"role": "user", "content": f"头痛发热{i}天，应该怎么办？ Question {i}"}] for i in range(5)]


def test_engine_choice_names_the_key(monkeypatch):
    import domaintune.llamacpp as llamacpp
    from domaintune.eval.models import choose_eval_engine

    assert choose_eval_engine("transformers")[0] == "transformers"
    monkeypatch.setattr(llamacpp, "unavailable_reason", lambda: "llama-cpp-python is not installed")
    with pytest.raises(UserError, match=r"eval\.engine"):
        choose_eval_engine("llamacpp")
    name, why = choose_eval_engine("auto")
    assert (name == "transformers" and "not installed" in why) or "CUDA" in why


def test_perplexity_follows_the_answering_engine_unless_told():
    from domaintune.eval.models import choose_scorer

    assert choose_scorer("auto", "llamacpp") == "llamacpp"  # scored on the answers' prompts
    assert choose_scorer("auto", "transformers") == "transformers"
    assert choose_scorer("transformers", "llamacpp") == "transformers"
    with pytest.raises(UserError, match=r"eval\.perplexity_engine"):
        choose_scorer("llamacpp", "transformers")


def _tiny_pair(tiny_model_dir):
    """The tiny model answering through transformers and through llama.cpp (skipped where llama.cpp is absent)."""
    from domaintune.eval.models import EvalModel, _hf_source
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import load_model_and_tokenizer

    reason = unavailable_reason() or converter_unavailable_reason()
    if reason:
        pytest.skip(reason)
    hf = EvalModel(
        "base",
        "local",
        "x",
        "tiny",
        loader=lambda: load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random-llama")),
    )
    cpp = EvalModel("base", "local", "x", "tiny", engine="llamacpp", loader=hf.loader)
    cpp.hf_source = functools.partial(_hf_source, tiny_model_dir, None, None)
    return hf, cpp


def test_llamacpp_answers_match_transformers_greedy(tiny_model_dir):
    from domaintune.eval.config import DecodingConfig
    from domaintune.llamacpp.verify import agreement

    decoding = DecodingConfig(max_new_tokens=8, batch_size=3)
    hf, cpp = _tiny_pair(tiny_model_dir)
    theirs = hf.generate(PROMPTS, decoding, seed=0)
    ours = cpp.generate(PROMPTS, decoding, seed=0)
    _, tokenizer = hf._ensure_loaded()
    scores = []
    for a, b in zip(theirs, ours):
        ref = tokenizer(a.text, add_special_tokens=False).input_ids
        scores.append(agreement(ref, tokenizer(b.text, add_special_tokens=False).input_ids))
        assert b.token_ids is not None and b.n_tokens is not None and b.n_tokens <= 8
    assert sum(scores) / len(scores) >= 0.8  # a q8_0 of the tiny model reproduces most greedy answers


def test_a_llamacpp_model_scores_while_answering_as_it_would_alone(tiny_model_dir):
    from domaintune.eval.config import DecodingConfig

    references = [f"多休息，多喝水。Rest and drink water, case {i}." for i in range(len(PROMPTS))]
    hf, cpp = _tiny_pair(tiny_model_dir)
    cpp.scorer = "llamacpp"
    decoding = DecodingConfig(max_new_tokens=8, batch_size=2)
    plain = cpp.generate(PROMPTS, decoding, seed=0)
    scored = cpp.generate(PROMPTS, decoding, seed=0, references=references)
    assert [a.text for a in scored] == [a.text for a in plain] and all(a.nll is None for a in plain)
    alone = cpp.reference_nll(PROMPTS, references, max_length=256, batch_size=2, desc="cpp")
    theirs = hf.reference_nll(PROMPTS, references, max_length=256, batch_size=2, desc="hf")
    for a, (nll, n), (t_nll, t_n) in zip(scored, alone, theirs):
        assert a.nll is not None and a.nll[1] == n == t_n
        assert a.nll[0] == pytest.approx(nll, rel=1e-3)  # the same q8_0 scores, with or without answering
        assert nll == pytest.approx(t_nll, rel=0.05)  # q8_0 against transformers' fp32
    with pytest.raises(ValueError, match=r"llama\.cpp only"):
        hf.generate(PROMPTS, decoding, seed=0, references=references)


def test_a_llamacpp_model_is_scored_by_transformers(tiny_model_dir):
    references = [f"多休息，多喝水。Rest and drink water, case {i}." for i in range(len(PROMPTS))]
    hf, cpp = _tiny_pair(tiny_model_dir)
    theirs = hf.reference_nll(PROMPTS, references, max_length=256, batch_size=2, desc="hf")
    ours = cpp.reference_nll(PROMPTS, references, max_length=256, batch_size=2, desc="cpp")
    # the same weights in fp32, not the q8_0 GGUF: identical sums (llama.cpp's would differ by ~1%)
    assert ours == theirs


def test_auto_keeps_transformers_when_the_gguf_tokenizes_differently(monkeypatch):
    from domaintune.config import config_from_dict
    from domaintune.eval.models import _check_gguf_tokenizer
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason
    from domaintune.llamacpp.runtime import GGUFModel

    reason = unavailable_reason() or converter_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cfg = config_from_dict({"name": "t", "model": {"name_or_path": "tiny-random-llama"}})
    assert _check_gguf_tokenizer(cfg, "auto", "why") == ("llamacpp", "why")  # a faithful GGUF vocabulary
    real = GGUFModel.tokenize
    monkeypatch.setattr(GGUFModel, "tokenize", lambda self, text, **kw: real(self, text, **kw)[:-1])
    engine, why = _check_gguf_tokenizer(cfg, "auto", "why")
    assert engine == "transformers" and "tokenizes differently" in why
    with pytest.raises(UserError, match=r"eval\.engine: transformers"):
        _check_gguf_tokenizer(cfg, "llamacpp", "why")
