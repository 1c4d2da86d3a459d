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

A BPE trained here puts a space between a message's role token and its content (`space_after_role`, saved in
tokenizer_config.json): byte-level BPE tokenizes a word after a space differently from the same word at the start
of a text, and in the pretraining corpus nearly every word follows a space. With the space, a reply's first word
is the token the model read in pretraining (" nworb", " 43") rather than a rarer split ("n", "wor", "b"), so what
pretraining taught carries over to replies. Tokenizers saved without the flag keep the format they were trained
with.

An imported model keeps its own tokenizer and chat template instead (nothing is added to its vocabulary).
Its special tokens are then named by Hugging Face's files beside tokenizer.json, which `load` reads and
`save` writes: tokenizer_config.json (bos_token, eos_token, pad_token, add_bos_token), chat_template.jinja
(the Jinja template `chat` renders conversations with) and generation_config.json (the ids that end a
reply: eos_token_id, one or several).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from .errors import UserError

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")
FILE_NAME = "tokenizer.json"
CONFIG_FILE, TEMPLATE_FILE, GENERATION_FILE = "tokenizer_config.json", "chat_template.jinja", "generation_config.json"
# Everything a model's tokenizer and chat format is read from; stages copy these beside every model they write.
FILES = (FILE_NAME, CONFIG_FILE, TEMPLATE_FILE, GENERATION_FILE, "special_tokens_map.json")
# The char model's unknown token is deliberately absent from its vocabulary: the library then refuses
# to encode an unseen character (we turn that into a UserError) instead of mapping it to a token.
_MISSING_UNK = "<|unk|>"


class Tokenizer:
    """Encode text to token ids and back; knows the ids of the special tokens."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None, chat_template: str | None = None,
                 stop_ids: Sequence[int] = (), space_after_role: bool = False):
        """`tok` with our six special tokens (the built-in chat format), or a model's own tokenizer with its
        `config` (tokenizer_config.json's fields: eos_token at least) and `chat_template` (Jinja source).
        `stop_ids`: more ids that end a reply besides the end-of-text token (generation_config's).
        `space_after_role`: the built-in format writes each message as <|role|> + " " + content (see above)."""
        model_type = type(tok.model).__name__
        if model_type == "BPE":
            self.kind = "bpe"
        elif model_type == "WordLevel":
            self.kind = "char"
        else:
            raise UserError(f"unsupported tokenizer model {model_type!r}: expected BPE or WordLevel (char)")
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.space_after_role = bool(space_after_role)
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        self.builtin = not missing  # our own special tokens: the built-in chat format can be used
        if missing and chat_template is None:
            raise UserError(f"tokenizer lacks the special tokens {missing} of the built-in chat format and has no "
                            f"chat template of its own ({TEMPLATE_FILE}); expected one of the two")
        if self.builtin and len({tok.token_to_id(t) for t in SPECIAL_TOKENS}) != len(SPECIAL_TOKENS):
            raise UserError(f"tokenizer maps two of the special tokens {SPECIAL_TOKENS} to the same id")
        # Special-token strings inside user text are encoded as ordinary text. This flag is not saved in
        # tokenizer.json, hence set on every construction. A rendered chat template is the one text whose
        # special tokens are meant: a second instance encodes it (the flag is per instance, and the server
        # encodes from several threads).
        tok.encode_special_tokens = True
        self._tok = tok
        self._rendered = None
        if self.builtin:
            self._special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
            self._roles = {"pad": self._special_ids["<|pad|>"], "bos": self._special_ids["<|bos|>"],
                           "eos": self._special_ids["<|eos|>"]}
        if chat_template is not None:
            self._roles = self._config_roles()
            self._rendered = tokenizers.Tokenizer.from_str(tok.to_str())
            self._rendered.encode_special_tokens = False
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *map(int, stop_ids)]))

    def _config_roles(self) -> dict[str, int]:
        """Ids of the config's bos/eos/pad tokens; pad and bos fall back to eos (any id does: pads are masked)."""
        roles = {}
        for role in ("bos", "eos", "pad"):
            name = self.config.get(f"{role}_token")
            if isinstance(name, dict):  # an AddedToken as transformers serialises it
                name = name.get("content")
            if name is None:
                continue
            if not isinstance(name, str) or self._tok.token_to_id(name) is None:
                raise UserError(f"{CONFIG_FILE}: {role}_token {name!r} is not a token of the tokenizer")
            roles[role] = self._tok.token_to_id(name)
        if "eos" not in roles:
            raise UserError(f"{CONFIG_FILE}: eos_token is missing; the chat template needs the token that ends a reply")
        roles.setdefault("pad", roles["eos"])
        roles.setdefault("bos", roles["eos"])
        return roles

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
        return cls(tok, space_after_role=True)

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
        """Load a tokenizer.json, or the tokenizer.json inside the folder `path`, with the chat template and
        special-token names of the files beside it (see the module docstring)."""
        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer at {file}: expected a {FILE_NAME} file or a folder holding one")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise UserError(f"{file} is not a valid tokenizer file: {e}") from None
        folder = file.parent
        config = _json_object(folder / CONFIG_FILE)
        template = config.get("chat_template")
        if (folder / TEMPLATE_FILE).is_file():
            template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise UserError(f"{folder / CONFIG_FILE}: chat_template must be a string, got {type(template).__name__}")
        stop = _json_object(folder / GENERATION_FILE).get("eos_token_id", [])
        stop = [stop] if isinstance(stop, int) else stop
        if not isinstance(stop, list) or not all(isinstance(i, int) for i in stop):
            raise UserError(f"{folder / GENERATION_FILE}: eos_token_id must be an id or a list of ids, "
                            f"got {stop!r:.60}")
        space = config.get("space_after_role", False)
        if not isinstance(space, bool):
            raise UserError(f"{folder / CONFIG_FILE}: space_after_role must be true or false, got {space!r:.60}")
        return cls(tok, config, template, stop, space)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically; `path` is a folder, or a file name ending in .json. A model's own
        chat format also writes tokenizer_config.json and chat_template.jinja beside it."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / FILE_NAME
        file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(file, self._tok.to_str(pretty=True))
        if self.chat_template is not None:
            config = {k: v for k, v in self.config.items() if k != "chat_template"}
            _write_atomic(file.parent / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            _write_atomic(file.parent / TEMPLATE_FILE, self.chat_template)
            if len(self.stop_ids) > 1:
                gen = _json_object(file.parent / GENERATION_FILE)
                gen["eos_token_id"] = list(self.stop_ids)
                _write_atomic(file.parent / GENERATION_FILE, json.dumps(gen, indent=2) + "\n")
        elif self.space_after_role:
            _write_atomic(file.parent / CONFIG_FILE, json.dumps({"space_after_role": True}, indent=2) + "\n")
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

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat template's text, whose special-token strings are the special tokens.
        Only for text the template wrote around contents checked by `special_tokens_in`."""
        if self._rendered is None:
            raise ValueError("encode_rendered is for a tokenizer with a chat template of its own")
        try:
            return self._rendered.encode(text, add_special_tokens=False).ids
        except Exception as e:
            raise self._encode_error(text, e) from None

    def special_tokens_in(self, text: str) -> list[str]:
        """The special-token strings that occur in `text` (a message must not smuggle in an end of turn)."""
        return [t for t in self.special_tokens if t in text]

    @property
    def special_tokens(self) -> list[str]:
        """The tokenizer's special tokens (added tokens marked special)."""
        if not hasattr(self, "_special_tokens"):
            added = json.loads(self._tok.to_str()).get("added_tokens", [])
            self._special_tokens = [a["content"] for a in added if a.get("special")]
        return self._special_tokens

    @property
    def begin(self) -> list[int]:
        """The ids a document starts with: <|bos|> for ours; a model's own BOS where its tokenizer adds one."""
        if self.builtin and self.chat_template is None:
            return [self.bos_id]
        return [self.bos_id] if self.config.get("add_bos_token") and "bos_token" in self.config else []

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
        return self._roles["pad"]

    @property
    def bos_id(self) -> int:
        return self._roles["bos"]

    @property
    def eos_id(self) -> int:
        return self._roles["eos"]

    @property
    def system_id(self) -> int:
        return self._builtin_id("<|system|>")

    @property
    def user_id(self) -> int:
        return self._builtin_id("<|user|>")

    @property
    def assistant_id(self) -> int:
        return self._builtin_id("<|assistant|>")

    def _builtin_id(self, token: str) -> int:
        if not self.builtin:
            raise ValueError(f"{token} belongs to the built-in chat format, which this tokenizer does not have")
        return self._special_ids[token]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the six special tokens of the built-in format."""
        return frozenset(self._special_ids.values()) if self.builtin else frozenset()

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, space_after_role={self.space_after_role})"


def _json_object(file: Path) -> dict:
    """A small JSON object file beside tokenizer.json, or {} when there is none."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _write_atomic(file: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
