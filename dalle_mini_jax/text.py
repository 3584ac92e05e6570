"""Text processing: the DALL·E Mini text normalizer and the BART byte-level BPE tokenizer.

A prompt goes through two stages before the text encoder sees it:

1. `TextNormalizer` (when the model's `normalize_text` is on, as in both releases): the
   original's 23 clean-up steps (reference §3.1), offline and deterministic.
2. `TextTokenizer`: BART's byte-level BPE, loaded from the released files of a model
   directory through the `tokenizers` library, padded and truncated to `text_len`.
   It gives the ids that transformers' `BartTokenizerFast` (the original's tokenizer)
   gives on the same files, so released checkpoints see the token ids they were trained on.

`train_bpe` trains a new tokenizer from captions and writes it in the released file
format, so that what we train loads in the original tools too.
"""

from __future__ import annotations

import functools
import html
import json
import math
import random
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import emoji
import ftfy
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers
from unidecode import unidecode

WORD_FREQUENCY_FILE = "enwiki-words-frequency.txt"

# --------------------------------------------------------------------------------------
# Normalizer
# --------------------------------------------------------------------------------------

# `<person>` (CC12M's anonymised names) is replaced by one of these, weighted by how often
# each occurs in English Wikipedia (the original's counts).
_PERSON_WORDS = ("a person", "someone", "somebody")
_PERSON_WEIGHTS = (282265, 121194, 12219)

# Characters that must survive the punctuation-to-comma step are hidden behind a
# placeholder made of letters only, so that no later step can touch it.
_HIDE = "xtokx"

# The original's regular expressions, in the order they are applied (reference §3.1).
_PERSON_RUN = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")
_WIKI_REF_START = re.compile(r"\A\s*\[\d+\]")
_WIKI_REF_END = re.compile(r"\[\d+\]\s*\Z")
_HTML_TAG = re.compile(r"<[^<]+?>")
_URL = re.compile(r"http\S+")
_THOUSANDS_COMMA = re.compile(r"(\d),(\d{3})")
_DOT_IN_WORD = re.compile(r"(\w)\.(\w)")
_CONTRACTION_QUOTE = re.compile(r"'(?=([stdm]|(ll)|(re)|(ve)|(ll))\b)")  # (ll) twice: sic
_SLASH_IN_NUMBER = re.compile(r"(\d)/(\d)")
_HYPHEN_IN_WORD = re.compile(r"(\w)-(\w)")
_SPACED_CHARS = re.compile(r"([%&\/$*])")
_HASHTAG = re.compile(r"#(\w+)")
_IGNORED_CHARS = re.compile(r"[_#\\]")
_QUOTES = re.compile(r"""['"`]""")
_PUNCTUATION = re.compile(r"[()[\].,|:;?!=+~\-\/{}]")
_REPEATED_CHAR = re.compile(r"(\D)(\1{3,})")  # 4+, not 3: roman numerals such as "viii"
_QUOTE_RUN = re.compile(r'(\s*"+\s*)+')
_COMMA_RUN = re.compile(r"(\s*,+\s*)+")
_WHITESPACE = re.compile(r"\s+")


class TextNormalizer:
    """The original DALL·E Mini prompt normalizer, offline and deterministic.

    A port of dalle-mini's `TextNormalizer` (src/dalle_mini/model/text.py, reference §3.1;
    its regular expressions unchanged, and checked to give the same output on a fuzzed
    corpus), with two deliberate differences:

    - The hashtag splitter's word-frequency file is read from disk, never downloaded. When
      it is absent, a hashtag is kept as one plain word (`#sunnyday` -> `sunnyday`),
      where the original would split it (`sunny day`).
    - `<person>` is replaced using a local `random.Random` seeded from `seed` and the
      text, so the same text and seed always give the same prompt. The original draws
      from the global `random` module (non-deterministic).

    The output depends on the installed ftfy, emoji and unidecode versions just as the
    original's did (emoji names, for one, have changed across emoji releases).

    Args:
      word_frequency_path: the `enwiki-words-frequency.txt` file (lines "word count",
        most frequent first), or a model directory that may hold it. None, or a
        directory without it: hashtags are not split.
      seed: seed of the `<person>` replacement.
    """

    def __init__(self, word_frequency_path: str | Path | None = None, seed: int = 0):
        self.seed = int(seed)
        self.word_frequency_path = _find_word_frequency_file(word_frequency_path)
        self._hashtags = (
            HashtagSplitter(self.word_frequency_path) if self.word_frequency_path else None
        )

    def __call__(self, text: str) -> str:
        """Normalizes one prompt.

        Args:
          text: the raw prompt.

        Returns:
          The normalized prompt: lower-case ASCII with one leading space, e.g.
          `" a photo of a cat, 1000 dollars"`.
        """
        if not isinstance(text, str):
            raise TypeError(f"TextNormalizer expects a str, got {type(text).__name__}")
        original = text
        # Steps numbered as in reference §3.1.
        t = ftfy.fix_text(text)  # 1
        t = html.unescape(html.unescape(t))  # 2: twice, for doubly escaped scraped text
        t = emoji.demojize(t)  # 3: before unidecode, which would delete emoji
        t = unidecode(t)  # 4
        t = t.lower()  # 5
        t = self._replace_person(t, original)  # 6
        t = _WIKI_REF_START.sub("", t)  # 7
        t = _WIKI_REF_END.sub("", t)
        t = _HTML_TAG.sub(" ", t)  # 8
        t = _URL.sub("", t)  # 9
        # 10: twice, because matches cannot overlap: "1,000,000" needs two passes.
        t = _THOUSANDS_COMMA.sub(r"\1\2", _THOUSANDS_COMMA.sub(r"\1\2", t))
        # 11: hide what step 16 must not turn into commas.
        t = _DOT_IN_WORD.sub(rf"\1{_HIDE}dot{_HIDE}\2", t)
        t = _CONTRACTION_QUOTE.sub(f"{_HIDE}quote{_HIDE}", t)
        t = _SLASH_IN_NUMBER.sub(rf"\1{_HIDE}slash{_HIDE}\2", t)
        t = _HYPHEN_IN_WORD.sub(r"\1 \2", t)  # 12
        t = _SPACED_CHARS.sub(r" \1 ", t)
        # 13. As in the original, a hashtag holding a step-11 placeholder ("#cat's") has
        # the placeholder split into letters ("cat x t o k x q u o t e x t o k x s"); kept,
        # since the released models were trained on that output.
        t = _HASHTAG.sub(self._expand_hashtag, t)
        t = _IGNORED_CHARS.sub(" ", t)  # 14
        t = _QUOTES.sub(' " ', t)  # 15
        t = _PUNCTUATION.sub(",", t)  # 16
        t = t.replace(f"{_HIDE}dot{_HIDE}", ".")  # 17
        t = t.replace(f"{_HIDE}quote{_HIDE}", "'")
        t = t.replace(f"{_HIDE}slash{_HIDE}", "/")
        t = _REPEATED_CHAR.sub(r"\1", t)  # 18
        t = _QUOTE_RUN.sub(' " ', t)  # 19
        t = _COMMA_RUN.sub(", ", t)  # 20
        t = _WHITESPACE.sub(" ", t)  # 21
        t = t.strip()  # 22: one comma at most from each end, as the original
        t = t[:-1] if t.endswith(",") else t
        t = t[1:] if t.startswith(",") else t
        return " " + t.strip()  # 23: BPE then sees every word with its leading space

    def _replace_person(self, t: str, original: str) -> str:
        t = _PERSON_RUN.sub(" people ", t)
        if "<person>" not in t:
            return t
        # A str seed is hashed with SHA-512 by `random`, so this is stable across processes
        # (unlike hash()). Seeding from the raw input, not the partly normalized text, is our
        # choice: the reference leaves the randomness unspecified.
        rng = random.Random(f"{self.seed}\x00{original}")
        while "<person>" in t:
            word = rng.choices(_PERSON_WORDS, weights=_PERSON_WEIGHTS)[0]
            t = t.replace("<person>", f" {word} ", 1)
        return t

    def _expand_hashtag(self, match: re.Match) -> str:
        word = match.group(1)
        return self._hashtags(word) if self._hashtags else word


def _find_word_frequency_file(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        candidate = path / WORD_FREQUENCY_FILE
        return candidate if candidate.is_file() else None
    if not path.is_file():
        raise FileNotFoundError(
            f"word-frequency file {path} does not exist; pass the released "
            f"{WORD_FREQUENCY_FILE}, a model directory holding it, or None to keep hashtags "
            "unsplit"
        )
    return path


class HashtagSplitter:
    """Splits a run-together hashtag into words (`sunnyday` -> `sunny day`).

    The original's adaptation of wordninja: a dynamic program that picks the split of
    least total cost, a word's cost being ln(1 + its rank) in the frequency file and
    infinite for an unknown word. Digits and a trailing "'s" are glued back onto their
    neighbours afterwards.

    Args:
      word_frequency_path: a text file, one "word count" line per word, most frequent first.
    """

    def __init__(self, word_frequency_path: str | Path):
        self._cost, self._max_len = _load_word_costs(str(word_frequency_path))

    def __call__(self, text: str) -> str:
        """Splits `text` (a hashtag without its '#') into space-separated words."""
        pieces = re.split(r"[^a-zA-Z0-9']+", text)
        return " ".join(word for piece in pieces for word in self._split(piece))

    def _split(self, s: str) -> list[str]:
        # best[i] = (least cost of s[:i], length of the last word of that split). Ties go
        # to the shorter last word, as in the original's min over (cost, length) pairs.
        best = [(0.0, 0)]
        for i in range(1, len(s) + 1):
            best.append(min(
                (best[i - n][0] + self._cost.get(s[i - n:i].lower(), math.inf), n)
                for n in range(1, min(i, self._max_len) + 1)
            ))
        words: list[str] = []
        i = len(s)
        while i > 0:
            n = best[i][1]
            word = s[i - n:i]
            # Glue "x" + "'s" and digit + digit back together; a lone "'" is never glued.
            if word != "'" and words and (
                words[-1] == "'s" or (s[i - 1].isdigit() and words[-1][0].isdigit())
            ):
                words[-1] = word + words[-1]
            else:
                words.append(word)
            i -= n
        return words[::-1]


@functools.lru_cache(maxsize=4)
def _load_word_costs(path: str) -> tuple[dict[str, float], int]:
    # Cached: the released file is large and every normalizer of a process can share it.
    words = [line.split()[0] for line in Path(path).read_text(encoding="utf8").splitlines()
             if line.strip()]
    if not words:
        raise ValueError(f"word-frequency file {path} holds no words")
    # A word listed twice takes its later rank, as in the original's dict comprehension.
    cost = {word: math.log(rank + 1) for rank, word in enumerate(words)}
    return cost, max(len(word) for word in cost)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

# BART's special tokens with their fixed ids; <mask> is the last id of the vocabulary.
BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
_SPECIAL_TOKENS = (BOS, PAD, EOS, UNK)

_TOKENIZER_FILE = "tokenizer.json"
_VOCAB_FILE = "vocab.json"
_MERGES_FILE = "merges.txt"


class TextTokenizer:
    """BART byte-level BPE with DALL·E Mini's padding, truncation and unconditional prompt.

    Build it with `from_pretrained` (a model directory) or `train_bpe`.

    Args:
      backend: a `tokenizers.Tokenizer` holding BART's pipeline (see `_bart_pipeline`).
      text_len: T, the number of tokens every prompt is padded or truncated to.
      normalizer: applied to each prompt before BPE; None to tokenize the text as given.
    """

    def __init__(self, backend: Tokenizer, text_len: int = 64,
                 normalizer: TextNormalizer | None = None):
        if text_len < 2:
            raise ValueError(f"text_len={text_len} leaves no room for <s> and </s>; use >= 2")
        self.backend = backend
        self.text_len = int(text_len)
        self.normalizer = normalizer
        self.bos_token_id, self.pad_token_id, self.eos_token_id = (
            backend.token_to_id(token) for token in (BOS, PAD, EOS)
        )

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, text_len: int = 64, normalize: bool = True,
                        seed: int = 0) -> "TextTokenizer":
        """Loads the tokenizer files of a model directory.

        Reads `tokenizer.json` when present (as `BartTokenizerFast` does), otherwise
        `vocab.json` + `merges.txt`. Only the vocabulary, merges and special tokens are
        read: the rest of the pipeline is always BART's, as transformers 5's
        `BartTokenizerFast` rebuilds it too.

        Args:
          path: a model directory (released DALL·E Mini / Mega, or one we saved).
          text_len: T, tokens per prompt (the model's `text_len`, 64 in both releases).
          normalize: run `TextNormalizer` on prompts first (the model's `normalize_text`).
            Its hashtag word list is `enwiki-words-frequency.txt` in `path` if present.
          seed: seed of the normalizer's `<person>` replacement.

        Returns:
          The tokenizer.
        """
        path = Path(path)
        if not path.is_dir():
            problem = "is a file, not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(
                f"tokenizer directory {path} {problem}; pass a model directory holding "
                f"{_TOKENIZER_FILE} or {_VOCAB_FILE} + {_MERGES_FILE}"
            )
        if (path / _TOKENIZER_FILE).is_file():
            vocab, merges, added = _read_tokenizer_json(path / _TOKENIZER_FILE)
        elif (path / _VOCAB_FILE).is_file() and (path / _MERGES_FILE).is_file():
            vocab = json.loads((path / _VOCAB_FILE).read_text(encoding="utf-8"))
            merges = _read_merges_txt(path / _MERGES_FILE)
            added = None
        else:
            raise FileNotFoundError(
                f"{path} holds no tokenizer: expected {_TOKENIZER_FILE}, or {_VOCAB_FILE} and "
                f"{_MERGES_FILE} (the released files of dalle-mini/dalle-mini). Copy them "
                "there, or train a tokenizer with dalle_mini_jax.text.train_bpe"
            )
        backend = _bart_pipeline(vocab, merges, added)
        normalizer = TextNormalizer(path, seed=seed) if normalize else None
        return cls(backend, text_len=text_len, normalizer=normalizer)

    def save_pretrained(self, path: str | Path) -> None:
        """Writes the released file set into `path` (created if needed).

        `vocab.json`, `merges.txt`, `tokenizer.json`, `special_tokens_map.json` and
        `tokenizer_config.json`, loadable by `BartTokenizerFast.from_pretrained(path)` and
        by `from_pretrained`; plus the normalizer's word-frequency file, if it uses one.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / _TOKENIZER_FILE))
        vocab = self.backend.get_vocab(with_added_tokens=True)
        vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
        (path / _VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = _read_tokenizer_json_text(self.backend.to_str())[1]
        (path / _MERGES_FILE).write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        # Written in the transformers format so that it keeps the special tokens' flags
        # (<mask> absorbs the space before it) whichever file it reads them from.
        added = {
            str(token_id): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                            "normalized": t.normalized, "single_word": t.single_word,
                            "special": t.special}
            for token_id, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        names = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "sep_token": EOS,
                 "pad_token": PAD, "cls_token": BOS, "mask_token": MASK}
        special_map = dict(names)
        for flags in added.values():
            if flags["content"] == MASK:  # a dict, so that its lstrip flag is kept
                special_map["mask_token"] = {k: v for k, v in flags.items() if k != "special"}
        (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
        config = {
            "tokenizer_class": "BartTokenizer",
            "add_prefix_space": False,
            "trim_offsets": True,
            "errors": "replace",
            # The model has text_len positions; a longer input cannot be encoded.
            "model_max_length": self.text_len,
            **names,
            "added_tokens_decoder": added,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        source = self.normalizer and self.normalizer.word_frequency_path
        if source and not (path / WORD_FREQUENCY_FILE).exists():
            shutil.copyfile(source, path / WORD_FREQUENCY_FILE)

    # ---- encoding -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (50265 for BART's vocabulary)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | list[str]) -> dict[str, np.ndarray]:
        """Normalizes (if on), tokenizes, pads and truncates a batch of prompts.

        A prompt longer than `text_len` tokens is cut to `<s>` + its first `text_len - 2`
        tokens + `</s>` (as the original's truncation), with a warning naming how many
        tokens were dropped.

        Args:
          texts: one prompt or a list of B prompts.

        Returns:
          `input_ids` [B, T] int32 (`<s> ... </s> <pad> ...`) and `attention_mask`
          [B, T] int32 (1 on the tokens, 0 on the padding); B = 1 for a single str.
        """
        batch = _as_batch(texts)
        if self.normalizer is not None:
            batch = [self.normalizer(text) for text in batch]
        return self._encode(batch)

    def unconditional(self, batch_size: int) -> dict[str, np.ndarray]:
        """The unconditional prompt of classifier-free guidance, repeated `batch_size` times.

        As the original, this is the tokenization of "" *without* normalization (which
        would turn it into " "): `<s> </s> <pad> ...` with mask `1 1 0 ...`.

        Returns:
          `input_ids` and `attention_mask`, both [batch_size, T] int32.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        one = self._encode([""])
        return {key: np.repeat(value, batch_size, axis=0) for key, value in one.items()}

    def _encode(self, batch: list[str]) -> dict[str, np.ndarray]:
        T = self.text_len
        input_ids = np.full((len(batch), T), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(batch), T), dtype=np.int32)
        for b, encoding in enumerate(self.backend.encode_batch(batch, add_special_tokens=True)):
            ids = encoding.ids
            if len(ids) > T:
                warnings.warn(
                    f"prompt {b} is {len(ids)} tokens long but the model takes {T}: "
                    f"{len(ids) - T} tokens dropped from its end (</s> kept)",
                    stacklevel=3,
                )
                # The same ids as BartTokenizerFast's truncation: it cuts the text to
                # T - 2 tokens and then adds <s> and </s>.
                ids = ids[:T - 1] + [self.eos_token_id]
            input_ids[b, :len(ids)] = ids
            attention_mask[b, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _as_batch(texts: str | list[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(
            f"prompts must be a str or a list of str, got {type(texts).__name__}"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {i} is a {type(text).__name__}, not a str")
    return list(texts)


def _bart_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]],
                   added: list[AddedToken] | None = None) -> Tokenizer:
    """BART's tokenizer pipeline, as `BartTokenizerFast` builds it, on a vocab and merges.

    Byte-level BPE with no prefix space and the GPT-2 split regex, no unknown token (every
    byte has a symbol), and `<s> ... </s>` around each text.

    Args:
      vocab: token -> id, BART's specials included or not.
      merges: the BPE merges, by rank.
      added: the special tokens with their matching flags (as a tokenizer.json lists
        them). None: BART's, where `<mask>` absorbs the space before it (lstrip), as
        BartTokenizerFast defines it in transformers 4 and the released tokenizer.json
        records it. (transformers 5 loading vocab.json + merges.txt alone leaves lstrip
        off; both agree on text without "<mask>", and normalized text never has one.)
    """
    backend = Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False,
    ))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if added is None:
        added = [AddedToken(token, special=True, normalized=False) for token in _SPECIAL_TOKENS]
        added.append(AddedToken(MASK, lstrip=True, special=True, normalized=False))
    backend.add_special_tokens(added)
    missing = [t for t in (BOS, PAD, EOS) if backend.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the vocabulary lacks BART's special tokens {missing}")
    backend.post_processor = processors.RobertaProcessing(
        (EOS, backend.token_to_id(EOS)), (BOS, backend.token_to_id(BOS)),
        trim_offsets=True, add_prefix_space=False,
    )
    byte_symbols = set(pre_tokenizers.ByteLevel.alphabet())
    if not byte_symbols <= vocab.keys():
        warnings.warn(
            f"the vocabulary lacks {len(byte_symbols - vocab.keys())} of the 256 byte symbols; "
            "characters made of them are silently dropped (as BartTokenizerFast does)"
        )
    return backend


def _read_tokenizer_json(path: Path):
    return _read_tokenizer_json_text(path.read_text(encoding="utf-8"))


def _read_tokenizer_json_text(text: str):
    """(vocab, merges, added special tokens) of a tokenizers serialization."""
    spec = json.loads(text)
    model = spec.get("model", {})
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise ValueError(f"tokenizer.json holds a {model.get('type')} model, not BART's BPE")
    # Older files write a merge as "a b", newer ones as ["a", "b"].
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    added = [
        AddedToken(t["content"], single_word=t.get("single_word", False),
                   lstrip=t.get("lstrip", False), rstrip=t.get("rstrip", False),
                   normalized=t.get("normalized", False), special=t.get("special", True))
        for t in spec.get("added_tokens", [])
    ]
    return model["vocab"], merges, added or None


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split(" ")) for line in lines if line]


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train_bpe(captions: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
              *, min_frequency: int = 2, text_len: int = 64) -> TextTokenizer:
    """Trains a BART-style byte-level BPE tokenizer on captions.

    Ids: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then the 256 byte symbols, then the
    merges, and `<mask>` last, as in BART's vocabulary. Captions are used as given: pass
    normalized ones (`map(TextNormalizer(), captions)`) for a model that normalizes its
    prompts.

    Args:
      captions: the training text.
      vocab_size: total ids wanted, specials included; fewer result when the captions
        offer fewer merges of `min_frequency`.
      out_dir: if given, the released file set is written there (`save_pretrained`).
      min_frequency: a pair is merged only if it occurs at least this often.
      text_len: T of the returned tokenizer.

    Returns:
      The tokenizer, without normalization.
    """
    floor = len(_SPECIAL_TOKENS) + 256 + 1
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is below {floor} (5 special tokens + 256 byte symbols)"
        )
    if isinstance(captions, str):
        raise TypeError("captions must be an iterable of str, not one str")
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <mask> is appended after training, as BART's last id
        min_frequency=min_frequency,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    scratch.train_from_iterator(captions, trainer)
    vocab, merges, _ = _read_tokenizer_json_text(scratch.to_str())
    vocab = {**vocab, MASK: len(vocab)}
    tokenizer = TextTokenizer(_bart_pipeline(vocab, merges), text_len=text_len)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
