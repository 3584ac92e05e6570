"""Tests of the text normalizer and the BPE tokenizer (dalle_mini_jax/text.py).

The tokenizer files are trained here (nothing is downloaded); transformers'
BartTokenizerFast, the original's tokenizer, is the reference for the ids.
"""

import json
import re
import shutil
import warnings

import numpy as np
import pytest

from dalle_mini_jax.text import (
    HashtagSplitter,
    TextNormalizer,
    TextTokenizer,
    train_bpe,
)

TEXT_LEN = 64
VOCAB_SIZE = 400  # reached with these captions (a larger ask stops at ~490)

# What the tests tokenize: punctuation, digits, unicode, emoji, whitespace runs, special
# tokens typed as text, long text, and the empty string.
CORPUS = [
    "",
    " ",
    "a",
    "A",
    "a photo of a cat",
    " a photo of a cat",
    "a photo of a cat ",
    "An oil painting of a lighthouse at dawn",
    "the Eiffel tower, made of cheese!",
    "sunset over the sea; a boat (small) and birds?",
    "a cat's hat isn't a dog's hat, they'll say",
    "\"quoted\" 'single' `backtick`",
    "e-mail: someone@example.com / https://example.com/path?q=1&r=2",
    "1,000,000 dollars, 3.14159 and 2022-08-21 at 10:30pm",
    "0123456789 9876543210",
    "100% & $5 * 2 = 10 # tag ~ ^ | \\ {x} [y] <z>",
    "!!!???...,,,;;;:::",
    "--- *** ___ === +++",
    "Café naïve façade résumé",
    "Ωμέγα λόγος",
    "Москва зимой",
    "東京タワー の 夜景",
    "한국어 문장",
    "עברית ערבית العربية",
    "ß ﬁ Æ œ ø å",
    "I ❤️ pizza 🍕",
    "😀😃😄😁 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "zero\u200bwidth and no\u00a0break",
    "ideographic\u3000space",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
    "tabs\tand\nnewlines\r\nmixed",
    "many     spaces      between",
    "   leading and trailing   ",
    "\t\n",
    "a <mask> in the middle",
    "<mask>",
    "literal <s> and </s> and <pad> and <unk>",
    "<person> and <person> at the beach",
    "#SunnyDay #tbt",
    "ALL CAPS PROMPT",
    "camelCaseWords and snake_case_words",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["a watercolor of a fox in a forest"] * 12),
    "emoji 🐱 " * 40,
    "x" + " " * 200 + "y",
]

# Captions the test tokenizer is trained on: varied enough to learn real merges.
_SUBJECTS = ["a cat", "a dog", "an astronaut", "the moon", "a red car", "two birds",
             "a lighthouse", "the Eiffel tower", "a bowl of ramen", "a café"]
_PLACES = ["on the beach", "in space", "at sunset", "under the sea", "in Tokyo",
           "on a mountain", "in the rain", "at night, 1,000 stars"]
_STYLES = ["oil painting", "photo", "watercolor", "3D render", "pixel art", "sketch"]
CAPTIONS = [f"{style} of {subject} {place}" for style in _STYLES for subject in _SUBJECTS
            for place in _PLACES] + CORPUS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory with the released tokenizer file set, trained on CAPTIONS."""
    path = tmp_path_factory.mktemp("model")
    train_bpe(CAPTIONS, vocab_size=VOCAB_SIZE, out_dir=path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return TextTokenizer.from_pretrained(model_dir, text_len=TEXT_LEN, normalize=False)


def _bart(path):
    transformers = pytest.importorskip("transformers")
    return transformers.BartTokenizerFast.from_pretrained(str(path))


def _copy(model_dir, dest, names):
    dest.mkdir()
    for name in names:
        shutil.copy(model_dir / name, dest / name)
    return dest


# --------------------------------------------------------------------------------------
# Equality with BartTokenizerFast
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text_len", [TEXT_LEN, 8])
def test_matches_bart_tokenizer_fast(model_dir, text_len):
    assert len(CORPUS) >= 40
    ours = TextTokenizer.from_pretrained(model_dir, text_len=text_len, normalize=False)
    ref = _bart(model_dir)(CORPUS, padding="max_length", truncation=True, max_length=text_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings
        got = ours(CORPUS)
    np.testing.assert_array_equal(got["input_ids"], np.array(ref["input_ids"]))
    np.testing.assert_array_equal(got["attention_mask"], np.array(ref["attention_mask"]))


def test_matches_bart_tokenizer_fast_from_tokenizer_json_alone(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path / "tj", ["tokenizer.json"])
    ours = TextTokenizer.from_pretrained(path, normalize=False)
    ref = _bart(path)(CORPUS, padding="max_length", truncation=True, max_length=TEXT_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ours(CORPUS)["input_ids"], np.array(ref["input_ids"]))


def test_matches_bart_tokenizer_fast_from_vocab_and_merges(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path / "vm", ["vocab.json", "merges.txt"])
    ours = TextTokenizer.from_pretrained(path, normalize=False)
    assert ours.backend.get_vocab() == _bart(path).get_vocab()
    # Text with "<mask>" is left out: from these two files alone, transformers 5 does not
    # let <mask> absorb the space before it, where transformers 4's BartTokenizerFast and
    # BART's released tokenizer.json do (and so do we; see the next test).
    corpus = [text for text in CORPUS if "<mask>" not in text]
    ref = _bart(path)(corpus, padding="max_length", truncation=True, max_length=TEXT_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ours(corpus)["input_ids"], np.array(ref["input_ids"]))


def test_mask_token_absorbs_the_space_before_it(model_dir, tmp_path):
    vm = _copy(model_dir, tmp_path / "vm", ["vocab.json", "merges.txt"])
    for path in (model_dir, vm):
        tok = TextTokenizer.from_pretrained(path, normalize=False)
        mask = tok.vocab_size - 1
        spaced, glued = tok(["a <mask>", "a<mask>"])["input_ids"]
        np.testing.assert_array_equal(spaced, glued)
        assert spaced[2] == mask


# --------------------------------------------------------------------------------------
# Shapes, padding, truncation, the unconditional prompt
# --------------------------------------------------------------------------------------


def test_padding_and_dtypes(tokenizer):
    out = tokenizer(["a cat", "a photo of a cat"])
    assert set(out) == {"input_ids", "attention_mask"}
    for value in out.values():
        assert value.shape == (2, TEXT_LEN) and value.dtype == np.int32
    ids, mask = out["input_ids"], out["attention_mask"]
    n = mask.sum(axis=1)
    for b in range(2):
        assert ids[b, 0] == 0 and ids[b, n[b] - 1] == 2  # <s> ... </s>
        assert (ids[b, n[b]:] == 1).all() and (mask[b, n[b]:] == 0).all()  # <pad>
        assert (mask[b, :n[b]] == 1).all()
    # A single str is a batch of one.
    np.testing.assert_array_equal(tokenizer("a cat")["input_ids"], ids[:1])


def test_truncation_keeps_eos_and_warns(tokenizer):
    text = " ".join(["a watercolor of a fox"] * 40)
    full = tokenizer.backend.encode(text).ids
    dropped = len(full) - TEXT_LEN
    assert dropped > 0
    with pytest.warns(UserWarning, match=f"{dropped} tokens dropped"):
        out = tokenizer([text, "a cat"])
    ids = out["input_ids"][0]
    assert out["attention_mask"][0].all()
    np.testing.assert_array_equal(ids[:-1], full[:TEXT_LEN - 1])
    assert ids[-1] == tokenizer.eos_token_id == 2


def test_long_empty_and_non_ascii_prompts_with_normalization(model_dir):
    tok = TextTokenizer.from_pretrained(model_dir, text_len=TEXT_LEN, normalize=True)
    long_text = ("Ünïcödé 🐱 #LongHashtag, 1,000 words & more! " * 250)[:10_000]
    assert len(long_text) == 10_000
    with pytest.warns(UserWarning, match="tokens dropped"):
        out = tok([long_text, "", "東京タワー の 夜景 😀", "<person> at the beach"])
    assert out["input_ids"].shape == (4, TEXT_LEN)
    assert (out["input_ids"][:, 0] == 0).all()
    assert out["input_ids"][0, -1] == 2
    # Normalization turns "" into " ": <s> Ġ </s>.
    assert out["attention_mask"][1].tolist()[:4] == [1, 1, 1, 0]


def test_unconditional_prompt(model_dir, tokenizer):
    for tok in (tokenizer, TextTokenizer.from_pretrained(model_dir, normalize=True)):
        out = tok.unconditional(3)
        expected_ids = np.array([0, 2] + [1] * (TEXT_LEN - 2), np.int32)
        expected_mask = np.array([1, 1] + [0] * (TEXT_LEN - 2), np.int32)
        for key, expected in (("input_ids", expected_ids), ("attention_mask", expected_mask)):
            assert out[key].dtype == np.int32
            np.testing.assert_array_equal(out[key], np.tile(expected, (3, 1)))
    # It is the tokenization of "" without normalization, as the original builds it.
    np.testing.assert_array_equal(tokenizer.unconditional(1)["input_ids"],
                                  tokenizer("")["input_ids"])


# --------------------------------------------------------------------------------------
# Training and the released file format
# --------------------------------------------------------------------------------------


def test_trained_files_and_special_ids(model_dir, tokenizer):
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json",
                 "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    vocab = json.loads((model_dir / "vocab.json").read_text())
    assert tokenizer.vocab_size == len(vocab) == VOCAB_SIZE
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert vocab["<mask>"] == len(vocab) - 1
    assert (model_dir / "merges.txt").read_text().startswith("#version")
    bart = _bart(model_dir)
    assert (bart.bos_token_id, bart.pad_token_id, bart.eos_token_id, bart.unk_token_id,
            bart.mask_token_id) == (0, 1, 2, 3, VOCAB_SIZE - 1)


def test_save_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = TextTokenizer.from_pretrained(tmp_path, normalize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(again(CORPUS)["input_ids"], tokenizer(CORPUS)["input_ids"])
    assert again.vocab_size == tokenizer.vocab_size


def test_save_pretrained_copies_the_word_frequency_file(model_dir, tmp_path):
    src = _copy(model_dir, tmp_path / "src", ["tokenizer.json"])
    (src / "enwiki-words-frequency.txt").write_text(WORD_FREQUENCIES)
    tok = TextTokenizer.from_pretrained(src, normalize=True)
    assert tok.normalizer("#SunnyDay") == " sunny day"
    tok.save_pretrained(tmp_path / "dst")
    again = TextTokenizer.from_pretrained(tmp_path / "dst", normalize=True)
    assert again.normalizer("#SunnyDay") == " sunny day"


# --------------------------------------------------------------------------------------
# Normalizer: the original's steps (expected outputs checked against the original code)
# --------------------------------------------------------------------------------------

WORD_FREQUENCIES = "".join(
    f"{word} {count}\n" for word, count in [
        ("the", 1000), ("in", 900), ("new", 800), ("sunny", 700), ("day", 600),
        ("york", 500), ("i", 400), ("love", 300), ("cats", 200), ("cat", 150),
    ]
)


@pytest.mark.parametrize("text, expected", [
    ("Tom &amp;amp; Jerry", " tom & jerry"),  # html unescaped twice
    ("cafÃ©", " cafe"),  # ftfy repairs mojibake
    ("I ❤️ pizza 🍕", " i, red heart, pizza, pizza"),  # emoji names, ':' -> ','
    ("Café naïve Ωmega 日本 ß", " cafe naive omega ri ben ss"),  # unidecode
    ("A CAT", " a cat"),  # lower case, leading space
    ("x", " x"),
    ("", " "),
    ("1,000,000 people and 12,345 cats", " 1000000 people and 12345 cats"),  # thousands
    ("state-of-the-art", " state of the art"),  # hyphen between words
    ("a -- b", " a, b"),
    ("it's a \"big\" `deal`", " it's a \" big \" deal \""),  # quotes
    ("we'll they're you've i'm he'd can't", " we'll they're you've i'm he'd can't"),
    ("cats; dogs! birds?", " cats, dogs, birds"),  # punctuation -> comma
    ("(a) [b] {c} | d = e + f ~ g", " a, b, c, d, e, f, g"),
    ("wow... really?!", " wow, really"),
    (",,,leading and trailing,,,", " leading and trailing"),
    ("3.5 km/h on 10/12", " 3.5 km, h on 10/12"),  # dots and slashes in numbers kept
    ("U.S.A. vs e.g.", " u.s, a, vs e.g"),
    ("50% & $5*2", " 50 % & $ 5 * 2"),  # spaces around % & $ * /
    ("[1] wiki text [23]", " wiki text"),  # wiki references
    ("<b>bold</b> see https://x.com/a now", " bold see now"),  # html tags, urls
    ("sooooo good!!!!", " so good"),  # 4+ repeats collapse
    ("a_b\\c", " a b c"),  # ignored characters
    ("  lots \t of \n space  ", " lots of space"),
    ("<person> and <person> met", " people met"),  # a run of <person>
])
def test_normalizer_steps(text, expected):
    assert TextNormalizer()(text) == expected


def test_hashtags_with_and_without_word_frequencies(tmp_path):
    freq = tmp_path / "enwiki-words-frequency.txt"
    freq.write_text(WORD_FREQUENCIES)
    with_file, with_dir = TextNormalizer(freq), TextNormalizer(tmp_path)
    without = TextNormalizer()
    for text, split, plain in [
        ("#SunnyDay in #NewYork2022", " sunny day in new york 2022",
         " sunnyday in newyork2022"),
        ("#ilovecats", " i love cats", " ilovecats"),
        # The original splits its own placeholder inside a hashtag; kept for fidelity
        # (the released models were trained on its output).
        ("#cat's toy", " cat x t o k x q u o t e x t o k x s toy", " cat's toy"),
    ]:
        assert with_file(text) == with_dir(text) == split
        assert without(text) == plain
    # A directory without the file means no splitting, not an error.
    (tmp_path / "empty").mkdir()
    assert TextNormalizer(tmp_path / "empty")("#ilovecats") == " ilovecats"
    assert HashtagSplitter(freq)("newyork_sunnyday") == "new york sunny day"


def test_person_replacement_is_deterministic():
    text = "<person> walking a dog with <person>, then <person> alone"
    outputs = {seed: TextNormalizer(seed=seed)(text) for seed in range(8)}
    person = "(a person|someone|somebody)"
    for seed, out in outputs.items():
        assert TextNormalizer(seed=seed)(text) == out  # same seed, same text: same prompt
        assert re.fullmatch(f" {person} walking a dog with {person}, then {person} alone", out)
    assert len(set(outputs.values())) > 1  # the seed matters


# --------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------


def test_invalid_inputs(model_dir, tokenizer, tmp_path):
    with pytest.raises(TypeError, match="str"):
        tokenizer(123)
    with pytest.raises(TypeError, match="prompt 1"):
        tokenizer(["a cat", None])
    with pytest.raises(TypeError, match="str"):
        TextNormalizer()(b"bytes")
    with pytest.raises(FileNotFoundError, match="train_bpe"):
        TextTokenizer.from_pretrained(tmp_path)  # a directory without tokenizer files
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TextTokenizer.from_pretrained(model_dir / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="word-frequency"):
        TextNormalizer(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["a cat"], vocab_size=100)
    with pytest.raises(ValueError, match="text_len"):
        TextTokenizer(tokenizer.backend, text_len=1)
    with pytest.raises(ValueError, match="batch_size"):
        tokenizer.unconditional(0)
