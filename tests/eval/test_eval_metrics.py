"""Metrics against values computed by hand, Chinese included."""

from __future__ import annotations

import math

import pytest

from domaintune.eval import metrics as M

REF_ZH = "我喜欢苹果"
PRED_ZH = "我喜欢香蕉"


def test_char_tokens_split_cjk_and_keep_latin_words():
    assert M.char_tokens("我喜欢苹果 COVID-19，ok！") == ["我", "喜", "欢", "苹", "果", "covid", "19", "ok"]
    # full-width letters are folded to half-width before tokenising
    assert M.char_tokens("ＡＢＣ１２３") == ["abc123"]


def test_word_tokens_use_jieba_for_chinese():
    assert M.word_tokens(REF_ZH) == ["我", "喜欢", "苹果"]
    assert M.word_tokens("Hello, world!") == ["hello", "world"]


def test_rouge_char_level_by_hand():
    # ref chars 我 喜 欢 苹 果, pred 我 喜 欢 香 蕉: 3 of 5 unigrams, 2 of 4 bigrams (我喜, 喜欢), LCS 3.
    scores = M.rouge(PRED_ZH, REF_ZH, "char")
    assert scores["rouge1_char"] == pytest.approx(60.0)
    assert scores["rouge2_char"] == pytest.approx(50.0)
    assert scores["rougeL_char"] == pytest.approx(60.0)


def test_rouge_word_level_by_hand():
    # jieba: 我/喜欢/苹果 vs 我/喜欢/香蕉: 2 of 3 words, 1 of 2 bigrams.
    scores = M.rouge(PRED_ZH, REF_ZH, "word")
    assert scores["rouge1_word"] == pytest.approx(200 / 3)
    assert scores["rouge2_word"] == pytest.approx(50.0)
    assert scores["rougeL_word"] == pytest.approx(200 / 3)


def test_rouge_score_default_tokenizer_zeroes_chinese_but_ours_does_not():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rougeL"]).score(REF_ZH, REF_ZH)["rougeL"].fmeasure
    assert default == 0.0  # why a custom tokenizer is needed
    assert M.rouge(REF_ZH, REF_ZH, "char")["rougeL_char"] == pytest.approx(100.0)


def test_rouge_english_unequal_lengths():
    # ref: the cat sat on the mat (6), pred: the cat sat (3): P=1, R=1/2 -> F=2/3
    assert M.rouge("the cat sat", "the cat sat on the mat", "char")["rouge1_char"] == pytest.approx(200 / 3)


def test_bleu_uses_zh_tokenizer_for_chinese():
    # Character n-gram precisions: 3/5, 2/4, 1/3, 0/2; sacrebleu's exp smoothing turns the zero
    # 4-gram count into 1/(2*2) -> 25%. No brevity penalty (equal lengths).
    expected = (60 * 50 * (100 / 3) * 25) ** 0.25
    assert M.sentence_bleu(PRED_ZH, REF_ZH) == pytest.approx(expected, rel=1e-9)
    import sacrebleu

    # With the default 13a tokenizer the whole sentence is one token: a wrong answer and a near miss look alike.
    assert sacrebleu.sentence_bleu(PRED_ZH, [REF_ZH]).score == 0.0
    assert M.bleu_tokenizer_for(REF_ZH) == "zh"
    assert M.bleu_tokenizer_for("plain English") == "13a"


def test_corpus_bleu_perfect_and_chinese():
    assert M.corpus_bleu([REF_ZH, "多喝水，注意休息"], [REF_ZH, "多喝水，注意休息"]) == pytest.approx(100.0)
    assert M.corpus_bleu([], []) is None


def test_chrf_by_hand():
    # char n-gram (n=1..6) precision = recall per order: 3/5, 2/4, 1/3, 0/2, 0/1 (no 6-grams): mean 28.67
    assert M.chrf(PRED_ZH, REF_ZH) == pytest.approx((60 + 50 + 100 / 3 + 0 + 0) / 5, abs=1e-6)


def test_exact_match_and_token_f1():
    assert M.exact_match("  Positive. ", "positive") == 100.0
    assert M.exact_match("多休息。", "多休息") == 100.0
    assert M.exact_match("多休息吧", "多休息") == 0.0
    # bag of chars: pred 我 喜 欢 香 蕉 vs ref: 3 common -> P=R=0.6
    assert M.token_f1(PRED_ZH, REF_ZH) == pytest.approx(60.0)
    # pred has 4 tokens, ref 2, 2 common: P=.5 R=1 F=2/3
    assert M.token_f1("a b c d", "a b") == pytest.approx(200 / 3)
    assert M.token_f1("", "a") == 0.0


def test_json_extraction_and_field_f1():
    assert M.parse_json_reference('{"name": "张三", "age": 30}') == {"name": "张三", "age": 30}
    assert M.parse_json_reference("not json") is None
    text = 'Here you go:\n```json\n{"name": "张三", "age": 31}\n```'
    pred = M.extract_json(text)
    assert pred == {"name": "张三", "age": 31}
    assert M.extract_json("no json here {broken") is None
    # ref pairs: name=张三, age=30, tags.0=a; pred: name=张三, age=31 -> TP 1, P=1/2, R=1/3, F=0.4
    ref = {"name": "张三", "age": 30, "tags": ["a"]}
    assert M.json_field_f1(pred, ref) == pytest.approx(40.0)
    assert M.json_field_f1(None, ref) == 0.0
    scores = M.score_item(text, '{"name": "张三", "age": 30}', ["json"])
    assert scores == {"valid_json": 100.0, "json_field_f1": pytest.approx(50.0)}


def test_classification_label_and_macro_f1():
    labels = ["positive", "negative", "neutral"]
    assert M.predicted_label("The sentiment is Negative.", labels) == "negative"
    assert M.predicted_label("negative, not positive", labels) == "negative"  # first mentioned
    assert M.predicted_label("no idea", labels) is None
    assert M.predicted_label("这是阳性结果", ["阳性", "阴性"]) == "阳性"
    gold = ["a", "a", "b", "b"]
    pred = ["a", "b", "b", None]
    # acc 2/4; F1(a): tp1 fp0 fn1 -> 2/3; F1(b): tp1 fp1 fn1 -> 1/2; macro 7/12
    out = M.classification_scores(gold, pred)
    assert out["accuracy"] == pytest.approx(50.0)
    assert out["macro_f1"] == pytest.approx(100 * 7 / 12)


def test_term_coverage(tmp_path):
    gloss = tmp_path / "g.txt"
    gloss.write_text("# terms\n高血压\n糖尿病\n\n阿司匹林  # drug\n高血压\n", encoding="utf-8")
    terms = M.load_glossary(gloss)
    assert terms == ["高血压", "糖尿病", "阿司匹林"]
    # reference has 高血压 and 阿司匹林; prediction has only 高血压 -> 50
    assert M.term_coverage("高血压要控制", "高血压患者可服阿司匹林", terms) == pytest.approx(50.0)
    assert M.term_coverage("anything", "没有术语", terms) is None
    # latin terms match whole words only; CJK terms as substrings
    latin = ["CT", "blood test"]
    assert M.term_coverage("that is correct", "the answer is correct", latin) is None
    assert M.term_coverage("Get a CT scan.", "A ct scan and a blood-test... no: a blood test", latin) == 50.0
    assert M.term_coverage("做CT检查", "建议做CT检查", latin) == 100.0
    empty = tmp_path / "e.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    from domaintune.errors import UserError

    with pytest.raises(UserError, match="no terms"):
        M.load_glossary(empty)


def test_percentile():
    assert M.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert M.percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert M.percentile([], 50) is None
    assert math.isclose(M.percentile([7.0], 95), 7.0)
