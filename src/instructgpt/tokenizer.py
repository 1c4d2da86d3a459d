"""The tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

Two kinds, both saved as a standard `tokenizer.json` (loadable by `transformers.PreTrainedTokenizerFast`):

- "bpe": byte-level BPE as in GPT-2, so any Unicode text round-trips exactly, with digits split one per
  token (arithmetic is easier to learn when 1234 is always 1 2 3 4);
- "char": one token per character seen in training (nanoGPT's shakespeare_char). A character that was
  not seen raises a `UserError` naming it; there is no unknown token, nothing is silently replaced.

The kind is not an extra field in the file (the `tokenizers` loader rejects unknown keys): it is read
from the model type stored there, BPE -> "bpe", WordLevel -> "char".

The six special tokens have ids 0..5. They are only ever produced by code that asks for them by id
(the chat renderer): `encode` of plain text never yields them, even when the text contains "<|eos|>".
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from .errors import UserError

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")
FILE_NAME = "tokenizer.json"
# The char model's unknown token is deliberately absent from its vocabulary: the library then refuses
# to encode an unseen character (we turn that into a UserError) instead of mapping it to a token.
_MISSING_UNK = "<|unk|>"


class Tokenizer:
    """Encode text to token ids and back; knows the ids of the special tokens."""

    def __init__(self, tok: tokenizers.Tokenizer):
        model_type = type(tok.model).__name__
        if model_type == "BPE":
            self.kind = "bpe"
        elif model_type == "WordLevel":
            self.kind = "char"
        else:
            raise UserError(f"unsupported tokenizer model {model_type!r}: expected BPE or WordLevel (char)")
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}; expected all of {SPECIAL_TOKENS}")
        if len({tok.token_to_id(t) for t in SPECIAL_TOKENS}) != len(SPECIAL_TOKENS):
            raise UserError(f"tokenizer maps two of the special tokens {SPECIAL_TOKENS} to the same id")
        # Special-token strings inside user text are encoded as ordinary text. This flag is not saved in
        # tokenizer.json, hence set on every construction.
        tok.encode_special_tokens = True
        self._tok = tok
        self._special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on a stream of texts; vocab_size counts the specials and the 256 bytes."""
        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise UserError(f"vocab_size {vocab_size} is too small for byte-level BPE: need at least {floor}")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # first in the vocabulary: ids 0..5
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is unknown
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per distinct character in texts (ids after the specials, in code-point order)."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for c in sorted(chars):
            vocab.setdefault(c, len(vocab))
        tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=_MISSING_UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one per code point
        tok.decoder = decoders.Fuse()  # join characters without spaces
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json, or the tokenizer.json inside the folder `path`."""
        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer at {file}: expected a {FILE_NAME} file or a folder holding one")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise UserError(f"{file} is not a valid tokenizer file: {e}") from None
        return cls(tok)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically; `path` is a folder, or a file name ending in .json."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / FILE_NAME
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str(pretty=True))
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; never special-token ids."""
        if not isinstance(text, str):
            raise UserError(f"can only encode str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:
            raise self._encode_error(text, e) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts, in parallel over the CPU cores (the library's thread pool)."""
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except Exception as e:
            bad = next((t for t in texts if not isinstance(t, str)), None)
            if bad is not None:
                raise UserError(f"can only encode str, got {type(bad).__name__}") from None
            for i, text in enumerate(texts):  # blame the first text the library cannot take
                error = self._encode_error(text, e)
                if error is not e:
                    raise UserError(f"text {i} of {len(texts)}: {error}") from None
            raise

    def _encode_error(self, text: str, e: Exception) -> Exception:
        # A lone surrogate ("\ud800", valid in JSON and in a Python str) is not text: the library refuses it
        # with a TypeError that names nothing.
        bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:
            return UserError(f"the text is not valid Unicode: a lone surrogate ({ascii(text[bad])[1:-1]}) at "
                             f"character {bad}")
        if self.kind == "char":
            unknown = sorted({c for c in text if self._tok.token_to_id(c) is None})
            if unknown:
                return UserError(
                    f"the char tokenizer has no token for {len(unknown)} character(s) in the text, "
                    f"e.g. {unknown[:5]!r}; train it on text that contains them, or use a BPE tokenizer"
                )
        return e

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    # -- sizes and special ids ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._special_ids["<|pad|>"]

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["<|eos|>"]

    @property
    def system_id(self) -> int:
        return self._special_ids["<|system|>"]

    @property
    def user_id(self) -> int:
        return self._special_ids["<|user|>"]

    @property
    def assistant_id(self) -> int:
        return self._special_ids["<|assistant|>"]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the six special tokens."""
        return frozenset(self._special_ids.values())

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
