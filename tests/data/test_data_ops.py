"""Each cleaning operation on its own: normalise, PII (check digit, Luhn), shingles, MinHash, formats."""

from __future__ import annotations

import numpy as np
import pytest

from domaintune.data import formats
from domaintune.data.minhash import LSHIndex, MinHasher
from domaintune.data.pii import id_check_digit, is_valid_id_card, luhn_valid, redact_pii
from domaintune.data.text import detect_language, ngrams, normalise_text, repetition_ratio


def test_normalise_width_html_control_whitespace():
    raw = "ＡＢＣ１２３，  &lt;b&gt; <p>hi&nbsp;there</p>\x00\x07\u200b x\u3000\u3000y\r\n\n\n\nz  "
    assert normalise_text(raw) == "ABC123， hi there x y\n\nz"  # letters and digits folded, ， kept
    assert normalise_text(raw, nfkc=True) == "ABC123, hi there x y\n\nz"  # the old behaviour, on request
    assert normalise_text("ｶﾀｶﾅ") == "カタカナ"  # half-width katakana → full-width
    assert normalise_text("a  b", whitespace=False) == "a  b"
    assert normalise_text("if x<y and y>z") == "if x<y and y>z"  # not a tag
    assert normalise_text("<script>alert(1)</script><BR/>ok<span class='x'>!</span>") == "ok !"


def make_id(first17: str) -> str:
    return first17 + id_check_digit(first17)


def luhn_complete(prefix: str) -> str:
    for d in "0123456789":
        if luhn_valid(prefix + d):
            return prefix + d
    raise AssertionError


def test_id_card_check_digit():
    assert id_check_digit("11010519491231002") == "X"  # the GB 11643 example number
    assert is_valid_id_card("11010519491231002X")
    assert is_valid_id_card("11010519491231002x")
    assert not is_valid_id_card("110105194912310021")
    valid = make_id("44030119900307123")
    wrong = valid[:-1] + ("0" if valid[-1] != "0" else "1")
    text, counts = redact_pii(f"身份证号{valid}，另一个{wrong}。")
    assert text == f"身份证号[ID_CARD]，另一个{wrong}。"
    assert counts == {"id_card": 1}


def test_bank_card_luhn():
    assert luhn_valid("4539578763621486") and not luhn_valid("4539578763621487")
    card = luhn_complete("622202123456789012")  # 19 digits
    bad = card[:-1] + str((int(card[-1]) + 1) % 10)
    spaced = " ".join(card[i : i + 4] for i in range(0, len(card), 4))
    text, counts = redact_pii(f"卡号 {spaced} 和 {bad}")
    assert text == f"卡号 [BANK_CARD] 和 {bad}"
    assert counts == {"bank_card": 1}
    table = "150 8 11 17 5 9 12 200 10 14 225 1"  # numbers in a table are not a card, even if Luhn-valid
    assert redact_pii(table) == (table, {})
    assert redact_pii(f"card {card}")[0] == "card [BANK_CARD]"


def test_pii_types_and_counts():
    text, counts = redact_pii(
        "手机 13812345678 或 +86 139-1234-5678；座机 010-62345678、(0755)83456789；"
        "邮件 zhang.san@example.com，网址 https://example.com/a?b=1. 服务器 192.168.1.20 版本 1.2.3.4.5"
    )
    assert "[PHONE]" in text and "13812345678" not in text
    assert "[LANDLINE]" in text and "62345678" not in text and "83456789" not in text
    assert "[EMAIL]" in text and "[URL]." in text and "[IP]" in text
    assert "1.2.3.4.5" in text  # not an IPv4 address
    assert counts == {"phone": 2, "landline": 2, "email": 1, "url": 1, "ipv4": 1}
    assert redact_pii("血压 120/80，心率 72 次，2023 年", None) == ("血压 120/80，心率 72 次，2023 年", {})
    assert redact_pii("mail a@b.org", ["phone"]) == ("mail a@b.org", {})


def test_cjk_char_shingles_and_word_shingles():
    assert ngrams("高血压 患者", 5, 3) == ["高血压患者"]
    assert ngrams("高血压患者能吃", 5, 3) == ["高血压患者", "血压患者能", "压患者能吃"]
    assert ngrams("The cat sat on it", 5, 3) == ["the cat sat", "cat sat on", "sat on it"]
    mh = MinHasher(num_perm=64, char_ngram=5)
    # CJK uses characters: one changed character touches at most 5 shingles
    a = "高血压患者首先要注意控制食盐摄入量每天不超过六克注意不要吃太油腻的食物多吃新鲜的绿色蔬菜水果"
    b = a.replace("六克", "五克")
    sa, sb = set(mh.shingle_hashes(a).tolist()), set(mh.shingle_hashes(b).tolist())
    assert len(sa) == len(a) - 4 and len(sa - sb) == 5
    # whitespace does not change CJK shingles
    assert set(mh.shingle_hashes(" ".join(a)).tolist()) == sa


def test_minhash_estimates_jaccard_and_lsh_keeps_first():
    rng = np.random.default_rng(0)
    vocab = [chr(0x4E00 + i) for i in range(3000)]
    base = ["".join(rng.choice(vocab, 200)) for _ in range(30)]
    mh = MinHasher(num_perm=128)
    errs = []
    for doc in base[:10]:
        chars = list(doc)
        for j in rng.choice(len(chars), 8, replace=False):
            chars[j] = vocab[rng.integers(len(vocab))]
        other = "".join(chars)
        sa, sb = set(mh.shingle_hashes(doc).tolist()), set(mh.shingle_hashes(other).tolist())
        exact = len(sa & sb) / len(sa | sb)
        sig = mh.signatures([doc, other])
        errs.append(abs((sig[0] == sig[1]).mean() - exact))
    assert np.mean(errs) < 0.06
    near = base[0][:195] + "一二三四五"  # Jaccard ≈ 0.95 with base[0]
    sigs = mh.signatures(base + [near, base[3]])
    index = LSHIndex(0.8, 128)
    res = index.add_batch(sigs, list(range(len(base) + 2)))
    assert [r.duplicate_of for r in res[:30]] == [None] * 30
    assert res[30].duplicate_of == 0 and res[30].similarity >= 0.8
    assert res[31].duplicate_of == 3 and res[31].similarity == 1.0


def test_repetition_and_language():
    assert repetition_ratio("肝病的最佳治疗方法是什么？" * 3) > 0.5
    assert repetition_ratio("高血压患者首先要注意控制食盐摄入量，每天不超过六克。") == 0.0
    assert detect_language("高血压患者能吃党参吗") == "zh"
    assert detect_language("What is high blood pressure?") == "en"
    assert detect_language("12345 !!!") is None


def test_formats_round_trip():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    alp = formats.messages_to_alpaca(msgs)
    assert alp == {"instruction": "u2", "input": "", "output": "a2", "system": "S", "history": [["u1", "a1"]]}
    assert formats.alpaca_to_messages(alp) == msgs
    sg = formats.messages_to_sharegpt(msgs)
    assert sg["system"] == "S" and sg["conversations"][0] == {"from": "human", "value": "u1"}
    assert formats.sharegpt_to_messages(sg["conversations"], system=sg["system"]) == msgs
    row = {"id": "r1", "messages": msgs, "source": "s", "department": "d"}
    assert formats.convert_row(row, "alpaca")["history"] == [["u1", "a1"]]
    assert formats.convert_row(row, "sharegpt")["department"] == "d"
    assert formats.convert_row(formats.convert_row(row, "alpaca"), "messages") == row
    with pytest.raises(ValueError, match="role"):
        formats.validate_messages([{"role": "robot", "content": "x"}])
