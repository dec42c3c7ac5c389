"""The data stage's pure parts: normalisation, filters, MinHash, n-grams, packing."""
import random

import numpy as np
import pytest

from internray.data.clean import detect_kind, normalize, quality_problem
from internray.data.config import CleanSection
from internray.data.minhash import MinHasher, estimated_jaccard
from internray.data.tokenize import pack, repeats
from internray.ngrams import ngram_hashes

ENGLISH = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch, "
           "wondering whether the rain will come before the harvest is finished this year.")
CHINESE = ("今天天气很好，我们一起去公园散步，看到很多人在湖边钓鱼，孩子们在草地上放风筝，大家都很开心。"
           "傍晚回家的路上，街边的小店飘来阵阵饭菜香味，让人忍不住停下脚步。")
CODE = "import os\n\ndef main():\n    for name in os.listdir('.'):\n        print(name)\n    return 0\n"


def test_normalize_removes_control_characters_and_keeps_lines():
    text = "Ｈｅｌｌｏ\u200b  world\x07\r\n\r\n\r\n\r\nnext\tline  "
    assert normalize(text, "NFKC") == "Hello world\n\nnext\tline"


@pytest.mark.parametrize("text,kind", [(ENGLISH, "en"), (CHINESE, "zh"), (CODE, "code"), ("12345 !!!", "other")])
def test_detect_kind(text, kind):
    assert detect_kind(text) == kind


@pytest.mark.parametrize("text,kind,reason", [
    ("Too short to keep.", "en", "too_short"),
    (ENGLISH * 30, "en", "too_long"),
    ("#### $$$$ %%%% @@@@ ^^^^ &&&& **** (((( )))) !!!! ~~~~ ++++ ==== a", "en", "low_alpha_ratio"),
    ("a" * 300 + " " + ENGLISH, "en", "line_too_long"),
    ("\n".join(["the same line again and again here"] * 6 + [ENGLISH]), "en", "duplicate_lines"),
    ("\n".join(f"buy now buy now buy now, line {i} of an advert" for i in range(12)), "en", "repeated_2gram"),
    ("\n".join([ENGLISH, "Meanwhile something else entirely.", ENGLISH.replace("this year", "next year")]),
     "en", "repeated_5grams"),
    (CHINESE, "zh", "language_zh"),
])
def test_each_filter_names_its_reason(text, kind, reason):
    cfg = CleanSection(max_chars=1000, max_line_chars=200, languages=["en", "code"])
    assert quality_problem(text, kind, cfg) == reason


def test_good_english_chinese_and_code_pass():
    cfg = CleanSection(min_chars=50)
    for text in (ENGLISH, CHINESE, CODE + 'class Thing:\n    size = 3\n'):
        assert quality_problem(text, detect_kind(text), cfg) is None


def test_minhash_estimate_tracks_true_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    base = [rng.choice(vocab) for _ in range(400)]
    hasher = MinHasher(num_perm=256, bands=32, rows=8, ngram=3)
    for edits in (5, 40, 120):
        other = list(base)
        for i in rng.sample(range(len(base)), edits):
            other[i] = rng.choice(vocab)
        a, b = set(hasher.shingles(" ".join(base))), set(hasher.shingles(" ".join(other)))
        true = len(a & b) / len(a | b)
        sig = hasher.signatures([" ".join(base), " ".join(other)])
        assert abs(estimated_jaccard(sig[0], sig[1]) - true) < 0.1


def test_identical_texts_share_every_band_and_chinese_gets_shingles():
    hasher = MinHasher()
    keys = hasher.band_keys(hasher.signatures([CHINESE, CHINESE, ENGLISH]))
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).any()
    assert len(hasher.shingles(CHINESE)) > 30


def test_ngram_hashes_ignore_case_and_punctuation():
    a = ngram_hashes("The Answer is: forty-two, said the computer to everyone present today.", 5)
    b = ngram_hashes("the answer is forty two said the computer to everyone present today", 5)
    assert len(a) > 0 and np.array_equal(a, b)
    assert len(ngram_hashes("too few tokens", 13)) == 0


def test_pack_keeps_every_token_in_order_and_records_boundaries():
    rng = random.Random(1)
    docs = [[rng.randrange(100) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    table = pack(docs, seq_len=16)
    rows = table.to_pylist()
    assert [t for r in rows for t in r["input_ids"]] == [t for d in docs for t in d]
    assert all(r["num_tokens"] == len(r["input_ids"]) == sum(r["doc_lens"]) for r in rows)
    assert all(r["num_tokens"] == 16 for r in rows[:-1])


def test_weights_repeat_or_subsample_deterministically():
    ids = [f"doc{i}" for i in range(4000)]
    assert [repeats(i, 2.0) for i in ids] == [2] * len(ids)
    half = sum(repeats(i, 0.5) for i in ids) / len(ids)
    assert 0.45 < half < 0.55
    assert [repeats(i, 1.5) for i in ids] == [repeats(i, 1.5) for i in ids]
