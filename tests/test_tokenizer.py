"""The tokenizer: exact round trips, special tokens out of reach of plain text, HF-compatible files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructgpt.errors import UserError
from instructgpt.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In 2024 there were 365 days; 12 + 30 = 42.",
    "Grüße aus Köln — naïve café, 東京は大きい。 Emoji: 🙂🚀",
    "def f(x):\n    return x * 2\n\n\tTabs and\r\nCRLF.",
] * 5
N_SPECIAL = len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return Tokenizer.train_char(CORPUS + ["<|>"])  # "<|eos|>" can then be spelled in plain text


# Text that mixes special-token strings (and their fragments) into arbitrary Unicode.
tricky_text = st.lists(
    st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TOKENS + ("<|", "|>", "<|eos", "<|unk|>")))
).map("".join)


def test_special_ids_and_kind(bpe: Tokenizer, char: Tokenizer) -> None:
    for tok, kind in ((bpe, "bpe"), (char, "char")):
        assert tok.kind == kind
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(N_SPECIAL))
        ids = (tok.pad_id, tok.bos_id, tok.eos_id, tok.system_id, tok.user_id, tok.assistant_id)
        assert ids == tuple(range(N_SPECIAL))
        assert tok.pad_id != tok.eos_id
        assert tok.decode([tok.bos_id, tok.eos_id], skip_special_tokens=False) == "<|bos|><|eos|>"
        assert tok.decode([tok.bos_id, tok.eos_id]) == ""


def test_bpe_vocab_size(bpe: Tokenizer) -> None:
    assert 262 < bpe.vocab_size <= 400
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train_bpe(CORPUS, vocab_size=100)


@settings(max_examples=200, deadline=None)
@given(text=tricky_text)
def test_bpe_round_trip_and_no_special_ids(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode(ids, skip_special_tokens=False) == text
    assert all(i >= N_SPECIAL for i in ids)


def test_special_strings_in_text_are_plain_text(bpe: Tokenizer, char: Tokenizer) -> None:
    text = "<|bos|>hi<|eos|><|pad|>"
    ids = bpe.encode(text)
    assert min(ids) >= N_SPECIAL and bpe.decode(ids) == text
    chars = Tokenizer.train_char([text])
    ids = chars.encode(text)
    assert len(ids) == len(text) and min(ids) >= N_SPECIAL and chars.decode(ids) == text


def test_digits_are_single_tokens(bpe: Tokenizer) -> None:
    for text in ("12345", "x2024y", "3.14159", " 365 days"):
        ids = bpe.encode(text)
        digit_tokens = [bpe.decode([i]) for i in ids if bpe.decode([i]).strip().isdigit()]
        assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())
        assert all(len(t) == 1 for t in digit_tokens)


def test_encode_batch_matches_encode(bpe: Tokenizer, char: Tokenizer) -> None:
    texts = ["", "hello world", "12 + 30 = 42", "🙂 <|eos|>"]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    texts = texts[:3]
    assert char.encode_batch(texts) == [char.encode(t) for t in texts]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_char_round_trip_on_its_alphabet(char: Tokenizer, data: st.DataObject) -> None:
    alphabet = sorted(set("".join(CORPUS) + "<|>"))
    text = data.draw(st.text(alphabet=alphabet))
    ids = char.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert all(i >= N_SPECIAL for i in ids)
    assert char.decode(ids) == text


def test_char_unknown_character_is_an_error(char: Tokenizer) -> None:
    with pytest.raises(UserError, match="no token for 1 character"):
        char.encode("the fox ☃")
    with pytest.raises(UserError, match="☃"):
        char.encode_batch(["the fox", "☃"])


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_same_ids(kind: str, bpe: Tokenizer, char: Tokenizer, tmp_path) -> None:
    tok = bpe if kind == "bpe" else char
    text = "".join(CORPUS[:4])
    file = tok.save(tmp_path / "tok")
    assert file == tmp_path / "tok" / "tokenizer.json" and file.is_file()
    expected = ["tokenizer.json", "tokenizer_config.json"] if tok.space_after_role else ["tokenizer.json"]
    assert sorted(p.name for p in file.parent.iterdir()) == expected  # no temporary file left
    for path in (tmp_path / "tok", file):
        loaded = Tokenizer.load(path)
        assert loaded.kind == kind
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode(text) == tok.encode(text)
        # the file does not remember encode_special_tokens: the wrapper must set it again
        assert min(loaded.encode("<|eos|>")) >= N_SPECIAL
    assert tok.save(tmp_path / "other.json") == tmp_path / "other.json"


def test_load_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer file"):
        Tokenizer.load(tmp_path)


def test_load_requires_special_tokens(bpe: Tokenizer, tmp_path) -> None:
    data = json.loads(bpe._tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|assistant|>"]
    del data["model"]["vocab"]["<|assistant|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="lacks the special tokens"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_transformers_loads_the_file(kind: str, bpe: Tokenizer, char: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = bpe if kind == "bpe" else char
    file = tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))
    for text in CORPUS[:4] + ["", "12345 apples"]:
        assert hf(text, add_special_tokens=True)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(N_SPECIAL))
