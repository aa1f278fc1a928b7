"""The batched llama.cpp decoder against transformers on the tiny Llama: same greedy tokens, same
perplexity, per-sequence stops, and a verification report within the f16 / q8_0 tolerances."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("llamacpp_ready")

CONVERSATIONS = [
    [{"role": "user", "content": "What helps against a fever?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "头痛怎么办？"}],
    [{"role": "user", "content": "Name three vitamins."}],
]


@pytest.fixture(scope="module")
def tiny_f16(tiny_model_dir, gguf_dir) -> Path:
    from domaintune.llamacpp.tools import convert_hf

    return convert_hf(tiny_model_dir, gguf_dir / "tiny-f16.gguf", "f16")


def test_batched_greedy_and_scores_match_transformers(tiny_model_dir, tiny_f16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.llamacpp.generate import Decoder, Sampling, generate, score_rows
    from domaintune.llamacpp.runtime import Context, GGUFModel
    from domaintune.llamacpp.verify import encode_rows, hf_greedy, hf_scores, top1_agreement

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [
        tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)).input_ids for c in CONVERSATIONS
    ]
    model = GGUFModel(tiny_f16)
    decoder = Decoder(model, stop_ids=[2], n_seq=2, seq_ctx=256)  # 3 prompts through 2 slots: a slot is reused
    ours = generate(decoder, prompts, Sampling(max_tokens=12))
    assert [s.tokens for s in ours] == hf_greedy(hf, prompts, 12, [2])
    rows = encode_rows(tok, CONVERSATIONS, ["Rest and water.", "多喝水。", "A, C and D."])
    ctx = Context(model, n_seq=2, seq_ctx=256, n_batch=256)
    ours, theirs = score_rows(ctx, rows), hf_scores(hf, rows)
    for (a, n, _), (b, m, _) in zip(ours, theirs):
        assert n == m and a == pytest.approx(b, rel=2e-3)
    # teacher-forced top-1 tokens: one per answer position, the transformers model's own on an f16 copy
    assert [len(t) for *_, t in ours] == [n for _, n, _ in theirs]
    assert top1_agreement([t for *_, t in ours], [t for *_, t in theirs]) >= 0.99


def test_stop_token_and_length_end_each_sequence_on_its_own(tiny_f16):
    from domaintune.llamacpp.generate import Decoder, Sampling, generate
    from domaintune.llamacpp.runtime import GGUFModel

    model = GGUFModel(tiny_f16)
    decoder = Decoder(model, stop_ids=[2], n_seq=4, seq_ctx=128)
    forced = Sampling(max_tokens=5, logit_bias={2: 1e4})
    free = Sampling(max_tokens=5, logit_bias={2: -1e4})
    stopped, ran = generate(decoder, [[1, 100, 200], [1, 100, 200]], [forced, free])
    assert stopped.finish_reason == "stop" and stopped.tokens == []
    assert ran.finish_reason == "length" and len(ran.tokens) == 5
    seeded = [Sampling(max_tokens=6, temperature=1.0, top_p=0.9, seed=7)] * 2
    a, b = generate(decoder, [[1, 300], [1, 300]], seeded)
    assert a.tokens == b.tokens  # same seed, same sample


def test_prompts_longer_than_a_batch_are_fed_over_several_steps(tiny_f16):
    from domaintune.llamacpp.generate import Decoder, Sampling, generate
    from domaintune.llamacpp.runtime import GGUFModel

    model = GGUFModel(tiny_f16)
    prompts = [[1, *range(100 + i, 100 + i + 60 + 7 * i)] for i in range(5)]  # 60-88 tokens each
    alone = [
        generate(Decoder(model, stop_ids=[2], n_seq=1, seq_ctx=128), [p], Sampling(max_tokens=6))[0] for p in prompts
    ]
    # a 64-token batch: every prompt is split across steps, next to other sequences' prompts and decoding tokens
    decoder = Decoder(model, stop_ids=[2], n_seq=3, seq_ctx=128, n_batch=64)
    together = generate(decoder, prompts, Sampling(max_tokens=6))
    assert [s.tokens for s in together] == [s.tokens for s in alone]
    assert decoder.decodes > len(prompts)


@pytest.mark.parametrize(
    ("n_batch", "max_scored_rows", "can_trim"), [(512, 512, True), (48, 7, True), (64, 512, False)]
)
def test_references_scored_after_each_answer_match_a_separate_pass_and_leave_answers_unchanged(
    tiny_f16, n_batch, max_scored_rows, can_trim
):
    """Each answer cut from the cache when it ends, its reference fed and scored on the same prompt: the answers
    are the tokens the same decoder gives without references, and the NLL the one a separate scoring pass gives;
    also with prompts split over several batches (48 tokens), references over several scoring calls (7 rows
    each), and a cache that cannot cut a tail (the prompt is fed again)."""
    from domaintune.llamacpp.generate import Decoder, Sampling, generate, score_rows
    from domaintune.llamacpp.runtime import Context, GGUFModel

    model = GGUFModel(tiny_f16)
    prompts = [[1, *range(100 + i, 130 + 9 * i)] for i in range(5)]  # 31-67 tokens
    references = [[*range(400 + i, 420 + 5 * i), 2] for i in range(5)]  # 21-41 tokens, the last one end of turn
    references[0] = [2]  # a one-token reference: scored on the prompt's last logits alone
    params = Sampling(max_tokens=8, repetition_penalty=1.05)
    plain = generate(Decoder(model, stop_ids=[2], n_seq=3, seq_ctx=160, n_batch=n_batch), prompts, params)
    decoder = Decoder(model, stop_ids=[2], n_seq=3, seq_ctx=160, n_batch=n_batch)
    decoder.max_scored_rows = max_scored_rows
    if not can_trim:
        decoder.ctx.trim = lambda seq, start: False  # type: ignore[method-assign]
    shared = generate(decoder, prompts, params, references=references)
    assert [s.tokens for s in shared] == [s.tokens for s in plain]
    separate = score_rows(Context(model, n_seq=2, seq_ctx=160, n_batch=256), list(zip(prompts, references)))
    for seq, (nll, n, _) in zip(shared, separate):
        assert n == len(seq.reference) and seq.nll == pytest.approx(nll, rel=1e-3)
    assert decoder.refed_prompts == (0 if can_trim else 4)  # a one-token reference is scored on the prompt alone
    assert decoder.scoring_decodes >= (1 if max_scored_rows == 512 else 4 * 20 // 7)
    assert not decoder.running and len(decoder.free_slots) == 3


@pytest.mark.slow  # two verifications with transformers generation: about a minute on a busy 2-core CPU
def test_verification_reports_agreement_perplexity_and_template(tiny_model_dir, tiny_f16, gguf_dir):
    from domaintune.llamacpp.quantize import quantize
    from domaintune.llamacpp.verify import verify_gguf

    refs = ["Rest and water.", "多喝水。", "A, C and D."]
    f16 = verify_gguf(tiny_f16, tiny_model_dir, "f16", CONVERSATIONS, refs, max_new_tokens=12)
    assert f16.ok, f16.problems
    assert f16.agreement == 1.0 and f16.ppl_change is not None and f16.ppl_change < 0.01
    assert f16.top1 is not None and f16.top1 >= 0.99
    q8 = verify_gguf(
        quantize(tiny_f16, gguf_dir / "tiny-q8_0.gguf", "q8_0"), tiny_model_dir, "q8_0", CONVERSATIONS, refs
    )
    assert q8.as_dict()["tolerance"] == {
        "min_agreement": 0.5,
        "max_perplexity_change": 0.03,
        "min_top1_agreement": 0.95,
    }
    assert q8.ppl_change is not None and q8.ppl_change < 0.03
    assert q8.as_dict()["top1_agreement"] >= 0.95


def test_top1_agreement_compares_every_position_on_the_same_history():
    from domaintune.llamacpp.verify import top1_agreement

    # one early difference costs one position, not the rest of the answer as free-running agreement would
    assert top1_agreement([[5, 9, 7, 7]], [[5, 8, 7, 7]]) == 0.75
    assert top1_agreement([[1, 2], [3]], [[1, 2], [4]]) == pytest.approx(2 / 3)
    assert top1_agreement([], []) is None


def test_a_file_that_predicts_other_tokens_fails_on_top1_even_with_close_perplexity():
    from domaintune.llamacpp.verify import _judge

    template = {"problems": []}
    good = _judge("q8_0", [0.6, 0.7], (4.14, 4.13, 0.002), 0.985, template)
    assert good.ok, good.problems
    bad = _judge("q8_0", [0.9, 0.9], (4.14, 4.13, 0.002), 0.90, template)
    assert not bad.ok and bad.problems == ["top-1 agreement 0.900 is below 0.95 for q8_0"]
    broken = _judge("f16", [0.1, 0.2], (4.13, 4.13, 0.0), 1.0, template)
    assert not broken.ok and "greedy agreement 0.15 is below 0.8 for f16" in broken.problems


def test_checks_of_several_types_share_the_merged_models_answers(tiny_model_dir, tiny_f16, gguf_dir, monkeypatch):
    from domaintune.llamacpp import verify
    from domaintune.llamacpp.quantize import quantize

    calls = {"greedy": 0, "scores": 0}
    for name in calls:
        real = getattr(verify, f"hf_{name}")

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(verify, f"hf_{name}", counted)
    refs = ["Rest and water.", "多喝水。", "A, C and D."]
    shared = verify.HFReference(tiny_model_dir)
    q8_path = quantize(tiny_f16, gguf_dir / "tiny-shared-q8_0.gguf", "q8_0")
    alone = verify.verify_gguf(q8_path, tiny_model_dir, "q8_0", CONVERSATIONS, refs, max_new_tokens=12)
    assert calls == {"greedy": 1, "scores": 1}
    verify.verify_gguf(tiny_f16, tiny_model_dir, "f16", CONVERSATIONS, refs, max_new_tokens=12, reference=shared)
    q8 = verify.verify_gguf(q8_path, tiny_model_dir, "q8_0", CONVERSATIONS, refs, max_new_tokens=12, reference=shared)
    assert calls == {"greedy": 2, "scores": 2}  # once for both types, not once each
    assert q8.as_dict() == alone.as_dict()


def test_repetition_penalty_is_transformers_rule_over_prompt_and_answer():
    """sample_token's penalty gives the logits transformers' RepetitionPenaltyLogitsProcessor gives over the
    prompt and the answer so far (each seen token once, positive logits divided, negative ones multiplied)."""
    import numpy as np
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from domaintune.llamacpp.generate import Sampling, Seq, sample_token

    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32)
    prompt, answer = [3, 5, 5, 9, 40], [9, 11, 63]
    expected = RepetitionPenaltyLogitsProcessor(1.05)(torch.tensor([prompt + answer]), torch.tensor(logits[None]))[0]
    ours = logits.copy()
    token = sample_token(ours, Seq(prompt, Sampling(max_tokens=4, repetition_penalty=1.05), tokens=answer))
    assert np.array_equal(ours, expected.numpy())  # sample_token penalises the array it is given
    assert token == int(expected.argmax())
    changed = sorted(np.flatnonzero(ours != logits).tolist())
    assert changed == sorted(set(prompt + answer)) and (logits[changed] < 0).any() and (logits[changed] > 0).any()
