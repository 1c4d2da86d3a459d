"""The chat template: exact ids and loss mask, and training ids == inference ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructgpt.chat import TextStream, render, render_prompt, render_response, reply_text, unended_response
from instructgpt.errors import UserError
from instructgpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def abc() -> Tokenizer:
    return Tokenizer.train_char(["abc"])  # a=6, b=7, c=8 after the six specials


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    corpus = ["Hello! How are you today? I am fine, thanks.", "What is 12 + 30? It is 42.", "Üñï©ødé ✓"]
    return Tokenizer.train_bpe(corpus * 10, vocab_size=320)


def test_hand_checked_ids_and_mask(abc: Tokenizer) -> None:
    assert [abc.token_to_id(c) for c in "abc"] == [6, 7, 8]
    messages = [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "bc"},
        {"role": "assistant", "content": "ca"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": ""},
    ]
    ids, mask = render(abc, messages)
    # bos | sys a eos | user b c eos | asst c a eos | user b eos | asst eos
    assert ids == [1, 3, 6, 2, 4, 7, 8, 2, 5, 8, 6, 2, 4, 7, 2, 5, 2]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1]
    assert render_prompt(abc, messages[:2]) == [1, 3, 6, 2, 4, 7, 8, 2, 5]
    assert render_response(abc, "ca") == [8, 6, 2]


def test_generation_prompt(abc: Tokenizer) -> None:
    messages = [{"role": "user", "content": "ab"}]
    ids, mask = render(abc, messages, add_generation_prompt=True)
    assert ids == [1, 4, 6, 7, 2, 5] and mask == [0] * 6
    assert render_prompt(abc, messages) == ids


def test_one_bos_and_trained_eos(bpe: Tokenizer) -> None:
    messages = [{"role": "user", "content": "<|bos|>Hello"}, {"role": "assistant", "content": "fine"}]
    ids, mask = render(bpe, messages)
    assert ids.count(bpe.bos_id) == 1 and ids[0] == bpe.bos_id
    assert ids[-1] == bpe.eos_id and mask[-1] == 1  # the model is taught to stop
    assert bpe.pad_id not in ids


roles = st.sampled_from(["system", "user", "assistant"])
message = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=30)})


@settings(max_examples=150, deadline=None)
@given(prefix=st.lists(message, max_size=5), last_user=st.text(max_size=30), reply=st.text(max_size=30))
def test_training_form_equals_prompt_plus_response(bpe: Tokenizer, prefix, last_user, reply) -> None:
    conversation = prefix + [{"role": "user", "content": last_user}]
    ids, mask = render(bpe, conversation + [{"role": "assistant", "content": reply}])
    prompt = render_prompt(bpe, conversation)
    response = render_response(bpe, reply)
    assert ids == prompt + response
    assert len(mask) == len(ids)
    assert mask[len(prompt) :] == [1] * len(response)  # the whole reply and its eos are labels
    assert ids.count(bpe.bos_id) == 1


@settings(max_examples=100, deadline=None)
@given(conversation=st.lists(message, min_size=1, max_size=6))
def test_mask_is_exactly_the_assistant_replies(bpe: Tokenizer, conversation) -> None:
    ids, mask = render(bpe, conversation)
    expected = [0]
    for m in conversation:
        n = len(bpe.encode(" " + m["content"])) + 1  # the format's space after the role token, then the eos
        expected += [0] + [int(m["role"] == "assistant")] * n
    assert mask == expected
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert sum(mask) == sum(len(render_response(bpe, r)) for r in replies)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user"}], "'role' and 'content'"),
        (["hi"], "'role' and 'content'"),
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
        ([{"role": "user", "content": 3}], "content must be a string, got int"),
        ([{"role": "user", "content": None}], "content must be a string, got NoneType"),
    ],
)
def test_invalid_messages(abc: Tokenizer, messages, match: str) -> None:
    with pytest.raises(UserError, match=match):
        render(abc, messages)
    with pytest.raises(UserError, match=match):
        render_prompt(abc, messages)


def test_prompt_must_end_with_user(abc: Tokenizer) -> None:
    with pytest.raises(UserError, match="must end with a user message"):
        render_prompt(abc, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(UserError, match="response must be a string"):
        render_response(abc, ["a"])


def test_space_after_role_puts_a_reply_first_word_as_in_running_text(bpe: Tokenizer, tmp_path) -> None:
    """A trained BPE writes <|role|> " " content: the reply's first word is the token it is after a space in the
    corpus, and its text (`reply_text`, the streamed text) drops that one space; an old tokenizer (no flag) keeps
    its format."""
    assert bpe.space_after_role and not Tokenizer.train_char(["abc"]).space_after_role
    hello = bpe.encode(" How")
    assert len(hello) == 1 and hello != bpe.encode("How")  # the corpus form is one token, the bare form is not
    assert render_response(bpe, "How") == hello + [bpe.eos_id]
    assert unended_response(bpe, "How") == hello
    ids, mask = render(bpe, [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "How"}])
    assert ids == [bpe.bos_id, bpe.user_id, *bpe.encode(" fine"), bpe.eos_id, bpe.assistant_id, *hello, bpe.eos_id]
    assert reply_text(bpe, hello + [bpe.eos_id]) == "How"
    assert reply_text(bpe, bpe.encode("  two")) == " two"  # only the format's one space goes
    stream = TextStream(bpe, reply=True)
    text = "".join(stream.push(t)[0] for t in bpe.encode(" Hello! How are you?"))
    assert text == stream.text == "Hello! How are you?"
    plain = TextStream(bpe)  # a completion's text keeps its spaces
    assert "".join(plain.push(t)[0] for t in bpe.encode(" Hello")) == " Hello"

    bpe.save(tmp_path / "new")
    assert Tokenizer.load(tmp_path / "new").space_after_role
    old = Tokenizer(Tokenizer.load(tmp_path / "new")._tok)  # as a tokenizer saved before the flag loads
    (tmp_path / "old").mkdir()
    old.save(tmp_path / "old")
    old = Tokenizer.load(tmp_path / "old")
    assert not old.space_after_role and not (tmp_path / "old" / "tokenizer_config.json").exists()
    assert render_response(old, "Hello") == old.encode("Hello") + [old.eos_id]
    assert reply_text(old, old.encode(" Hello")) == " Hello"
    (tmp_path / "new" / "tokenizer_config.json").write_text('{"space_after_role": "yes"}')
    with pytest.raises(UserError, match=r"tokenizer_config.json: space_after_role must be true or false"):
        Tokenizer.load(tmp_path / "new")
