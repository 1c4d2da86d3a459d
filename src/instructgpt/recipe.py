"""A stage's arguments as one dataclass, from a recipe file and the command line.

Each stage takes its arguments as one dataclass, with shared parts (training settings and the like) nested as
dataclass fields. On the command line nested fields keep flat flags (`--lr`, not `--train.lr`), so a flat name
means one thing across the whole nesting. A recipe file (YAML or TOML) may give any flag, flat (`lr: 3e-4`,
`batch-size: 16`) or in sections named after the nested fields (`train: {lr: 3e-4}`); flags given on the command
line override the file. `OUT/args.json` holds the resolved arguments in the same shape, so it is itself a recipe
that reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar

import tyro
import yaml

from .checkpoint import atomic_write
from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")

_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "YAML"}  # JSON is YAML (an args.json)
CONFIG_NOTE = (
    "Every flag can also be set in a YAML or TOML file given with --config FILE (keys as the flags, with - or _, "
    "flat or in sections named after the nested settings); flags given on the command line override the file."
)


# ---------------------------------------------------------------------------------------------------------------
# Reading a recipe file


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes for recipe files.

    PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string, not a number: a learning rate written the way
    everyone writes it would then be rejected as "str". Floats here follow YAML 1.2 instead. And a key given
    twice is an error rather than the last one silently winning.
    """


_FLOAT = "tag:yaml.org,2002:float"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping_once(loader: _RecipeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping below says so with its line
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_once)


def read_recipe_file(path: Path) -> dict:
    """A YAML (.yaml/.yml), TOML (.toml) or JSON (.json, e.g. a stage's OUT/args.json) file as a dict.

    Errors (missing file, unknown suffix, parse error with its line, top level not a mapping) are UserError
    naming the file, and the line where the parser knows it. An empty file (or one with only comments) is an
    empty recipe.
    """
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        found = repr(path.suffix) if path.suffix else "a name without a suffix"
        raise UserError(f"{path}: a recipe file is .yaml, .yml, .toml or .json, not {found}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; expected a .yaml, .yml, .toml or .json recipe file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the recipe file: {e.strerror or e}") from None
    if kind == "TOML":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
            raise UserError(f"{path}: invalid TOML: {e}") from None
    else:
        try:
            data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: no Python objects from a file
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = ": ".join(part for part in (e.context, e.problem) if part)
            raise UserError(f"{where}: invalid YAML: {problem or e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML: {e}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level of a recipe file is a mapping of flags to values, not a "
                        f"{_type_name(data)}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# The fields of an arguments dataclass


def _strip_annotated(tp: Any) -> Any:
    # tyro markers ride in Annotated[...]; the type under them is what the value must be
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _hints(cls: type) -> dict[str, Any]:
    """Field annotations of `cls`, resolved (modules with `from __future__ import annotations` leave strings)."""
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception as e:
        raise TypeError(f"cannot resolve the annotations of {cls.__qualname__}: {e}") from e


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type with Annotated stripped) for each field that __init__ takes: tyro sets only those."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    hints = _hints(cls)
    return [(f, _strip_annotated(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def _leaves(cls: type) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Flat key -> (attribute path, type) for every non-section field under `cls`."""
    leaves: dict[str, tuple[tuple[str, ...], Any]] = {}
    sections = []
    for f, tp in _init_fields(cls):
        if _is_section(tp):
            sections.append(f.name)
            below = {key: ((f.name, *path), t) for key, (path, t) in _leaves(tp).items()}
        else:
            below = {f.name: ((f.name,), tp)}
        for key, (path, t) in below.items():
            if key in leaves:
                raise TypeError(
                    f"{cls.__qualname__}: the flag --{key.replace('_', '-')} is both {'.'.join(leaves[key][0])} and "
                    f"{'.'.join(path)}; flat flags must be unique across the nested dataclasses"
                )
            leaves[key] = (path, t)
    for name in sections:
        if name in leaves:
            raise TypeError(
                f"{cls.__qualname__}: {name!r} names both a section and the flag at {'.'.join(leaves[name][0])}; "
                "a recipe file could not tell them apart"
            )
    return leaves


def flag_paths(cls: type) -> dict[str, tuple[str, ...]]:
    """Flat key (field name with '_', e.g. 'batch_size') -> path of attribute names through nested dataclass
    fields, e.g. {'lr': ('train', 'lr'), 'init': ('init',)}.

    Nested dataclass-typed fields are descended (their own name is not a key). Two fields with the same flat name
    anywhere in the nesting would be one flag on the command line: a TypeError, since the dataclasses are wrong.
    """
    return {key: path for key, (path, _) in _leaves(cls).items()}


# ---------------------------------------------------------------------------------------------------------------
# Checking and converting values


class _WrongType(Exception):
    """A value that does not fit its annotation, at `where` (a key, or a key and an index)."""

    def __init__(self, where: str, tp: Any, value: Any):
        super().__init__(where)
        self.where, self.tp, self.value = where, tp, value


def _type_name(value: Any) -> str:
    return {dict: "mapping", list: "list", type(None): "null"}.get(type(value), type(value).__name__)


def _describe(tp: Any) -> str:
    """An annotation as a reader of the error wants it: 'float or None', 'a list of Path', "'loss' or 'labeler'"."""
    tp = _strip_annotated(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "None"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}" if args else "a mapping"
    if _is_section(tp):
        return f"a mapping of {tp.__name__} settings"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " or ".join(repr(name) for name in tp.__members__)
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """`value` as the field type `tp` wants it, or _WrongType.

    Converts only where nothing can be lost or misread: str -> Path, int -> float, list -> tuple. A bool is never
    a number (YAML's `true` for `--batch-size` is a typo, not 1) and a number is never a string.
    """
    tp = _strip_annotated(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, TypeVar):
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise _WrongType(where, tp, value)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for member in args:  # in the order written: `int | float` keeps 1 an int, `float | int` makes it 1.0
            try:
                return _convert(value, member, where, source)
            except _WrongType:
                continue
        raise _WrongType(where, tp, value)
    if origin is Literal:
        # type(value) is type(a): True == 1, but a flag that takes 1 does not take true
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _WrongType(where, tp, value)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        container = origin or tp
        if not isinstance(value, (list, tuple)):
            raise _WrongType(where, tp, value)
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _WrongType(where, tp, value)
            return tuple(_convert(v, t, f"{where}[{i}]", source) for i, (v, t) in enumerate(zip(value, args)))
        element = args[0] if args else Any
        return container(_convert(v, element, f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _WrongType(where, tp, value)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, f"{where}[{k!r}]", source): _convert(v, value_tp, f"{where}[{k!r}]", source)
            for k, v in value.items()
        }
    if _is_section(tp):  # a dataclass not descended into (e.g. `Train | None`): a mapping or an instance
        if isinstance(value, tp):
            return dataclasses.replace(value)
        if isinstance(value, Mapping):
            return build(tp, value, f"{source}, {where}")
        raise _WrongType(where, tp, value)
    if not isinstance(tp, type):
        return value  # an annotation this module does not know (a Callable, a Protocol): tyro's business
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _WrongType(where, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _WrongType(where, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _WrongType(where, tp, value)
    if issubclass(tp, PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _WrongType(where, tp, value)
    if issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
        raise _WrongType(where, tp, value)
    if isinstance(value, tp):
        return value
    raise _WrongType(where, tp, value)


def _wrong_type_error(e: _WrongType, source: str) -> UserError:
    found = f"{_type_name(e.value)} {e.value!r}" if e.value is not None else "null"
    return UserError(f"{source}: {e.where!r} must be {_describe(e.tp)}, not {found}")


# ---------------------------------------------------------------------------------------------------------------
# Building an arguments dataclass


def _is_missing(value: Any) -> bool:
    return value is tyro.MISSING or value is tyro.MISSING_NONPROP or value is dataclasses.MISSING


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _display(key: str, user_key: str) -> str:
    # suggest in the spelling the user writes: 'batch-size' for a file that uses dashes
    return key.replace("_", "-") if "-" in user_key else key


def _collect(
    cls: type,
    values: Mapping,
    source: str,
    prefix: tuple[str, ...],
    where: str,
    out: dict[tuple[str, ...], tuple[str, Any]],
) -> None:
    """Check every key of `values` (the whole file, or one section of it) and put (the key as written, the
    converted value) in `out` under its attribute path."""
    leaves = _leaves(cls)
    sections = {f.name: tp for f, tp in _init_fields(cls) if _is_section(tp)}
    for key, value in values.items():
        if not isinstance(key, str):
            scope = f" in the section {where!r}" if where else ""
            raise UserError(f"{source}: the key {key!r}{scope} is {_type_name(key)}, not a flag name")
        name = key.replace("-", "_")
        shown = f"{where}.{key}" if where else key
        if name in sections:
            sub = sections[name]
            if isinstance(value, sub):  # an instance given programmatically: its fields, one by one
                value = {f.name: getattr(value, f.name) for f, _ in _init_fields(sub)}
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: {shown!r} is the section of {sub.__name__} settings and must be a "
                                f"mapping, not {_type_name(value)} {value!r}")
            _collect(sub, value, source, (*prefix, name), shown, out)
            continue
        if name not in leaves:
            known = [*leaves, *sections]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(_display(c, key)) for c in close)}?" if close else ""
            scope = f" in the section {where!r}" if where else ""
            raise UserError(f"{source}: unknown key {key!r}{scope}{hint}")
        path, tp = leaves[name]
        full = (*prefix, *path)
        if full in out:
            raise UserError(f"{source}: {'.'.join(full)} is set twice (as {out[full][0]!r} and as {shown!r})")
        try:
            out[full] = (shown, _convert(value, tp, shown, source))
        except _WrongType as e:
            raise _wrong_type_error(e, source) from None


def _assemble(
    cls: type, assigned: dict[tuple[str, ...], tuple[str, Any]], base: Any, prefix: tuple[str, ...], missing: list[str]
) -> Any:
    kwargs = {}
    for f, tp in _init_fields(cls):
        path = (*prefix, f.name)
        current = getattr(base, f.name) if base is not None else _field_default(f)
        if _is_section(tp):
            # the section's own base: base's (or the field default's) instance, so `train: Train =
            # field(default_factory=lambda: Train(lr=1e-5))` keeps its 1e-5; copied, never shared
            sub_base = current if isinstance(current, tp) else None
            kwargs[f.name] = _assemble(tp, assigned, sub_base, path, missing)
        elif path in assigned:
            kwargs[f.name] = assigned[path][1]
        elif _is_missing(current):
            missing.append(f.name)
            kwargs[f.name] = tyro.MISSING
        else:
            kwargs[f.name] = _copy(current)
    return cls(**kwargs)


def _copy(value: Any) -> Any:
    # a default list (or a base's) must not be shared with the result: appending to one would change the other
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value)
    if isinstance(value, (list, dict, set)):
        return type(value)(value)
    return value


def build(cls: type[T], values: Mapping[str, Any], source: str, base: T | None = None, partial: bool = False) -> T:
    """An instance of dataclass `cls` from `values`, on top of `base` (default: cls's defaults).

    Keys may be flat (flag names, with '-' or '_': 'batch-size' == 'batch_size') or nested sections named by the
    dataclass field ('train': {'lr': ...}); both may mix, but one field set twice is an error. An unknown key is
    a UserError naming the key, `source` (e.g. the file name) and the closest known keys. Values are checked
    against the field's annotation and converted (see `_convert`); a wrong type is a UserError naming the key,
    `source`, the expected and the found type.

    Required fields (no default) missing from `values` and `base`: with partial=True they become tyro.MISSING,
    so that tyro asks for them as required flags; with partial=False that is a UserError naming them.
    Nested dataclass instances are copied, never shared with `base` or the defaults.
    """
    if not isinstance(values, Mapping):
        raise UserError(f"{source}: expected a mapping of flags to values, not {_type_name(values)}")
    if base is not None and not isinstance(base, cls):
        raise TypeError(f"base must be a {cls.__qualname__}, got {type(base).__qualname__}")
    assigned: dict[tuple[str, ...], tuple[str, Any]] = {}
    _collect(cls, values, source, (), "", assigned)
    missing: list[str] = []
    result = _assemble(cls, assigned, base, (), missing)
    if missing and not partial:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in missing)
        raise UserError(f"{source}: missing required {'setting' if len(missing) == 1 else 'settings'}: {flags}")
    return result


def _missing_flags(args: Any) -> list[str]:
    found = []
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, dataclasses.MISSING)
        if _is_missing(value):
            found.append(f"--{f.name.replace('_', '-')}")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            found.extend(_missing_flags(value))
    return found


# ---------------------------------------------------------------------------------------------------------------
# The command line


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--config FILE` / `--config=FILE` out of argv: (FILE or None, the other arguments)."""
    config: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # everything after it is positional: tyro's, not ours
            rest.extend(argv[i:])
            break
        if arg == "--config" or arg.startswith("--config="):
            if config is not None:
                raise UserError("--config given twice; put everything in one recipe file, and flags on top")
            if arg == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise UserError("--config needs a file: --config recipe.yaml")
                config = argv[i + 1]
                i += 2
                continue
            config = arg.removeprefix("--config=")
            if not config:
                raise UserError("--config needs a file: --config recipe.yaml")
        else:
            rest.append(arg)
        i += 1
    return config, rest


def _own_description(cls: type) -> str | None:
    doc = cls.__doc__
    # a dataclass without a docstring gets its signature as __doc__; tyro skips that, and so do we
    if not doc or doc.startswith(f"{cls.__name__}("):
        return None
    return inspect.cleandoc(doc)


def parse_args(cls: type[T], argv: list[str], prog: str, description: str | None = None) -> T:
    """The command line of one stage: `--config FILE` (YAML or TOML) gives the defaults, the flags override them.

    Fields that are required and not in the file are required flags (tyro asks for them by name).
    """
    config, rest = _split_config(list(argv))
    if config is None:
        defaults = build(cls, {}, "the defaults", partial=True)
    else:
        defaults = build(cls, read_recipe_file(Path(config)), config, partial=True)
    text = description if description is not None else _own_description(cls)
    text = f"{text.rstrip()}\n\n{CONFIG_NOTE}" if text else CONFIG_NOTE
    args = tyro.cli(
        cls, args=rest, default=defaults, prog=prog, description=text, config=(tyro.conf.OmitArgPrefixes,)
    )
    missing = _missing_flags(args)
    if missing:  # tyro asks for required flags itself; this is the guard should a version stop doing so
        raise UserError(f"missing required {'flag' if len(missing) == 1 else 'flags'}: {', '.join(missing)}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# OUT/args.json


def _plain(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def to_dict(args: Any) -> dict:
    """Nested plain dict of a dataclass instance (dataclasses.asdict) with Paths as str and tuples as lists:
    what OUT/args.json holds, and what build() reads back to the same instance."""
    if not (dataclasses.is_dataclass(args) and not isinstance(args, type)):
        raise TypeError(f"to_dict takes a dataclass instance, got {type(args).__qualname__}")
    return _plain(dataclasses.asdict(args))


def write_args(out: Path, args: Any) -> None:
    """OUT/args.json: the resolved arguments of a run, in the shape build() reads back, written atomically
    (`checkpoint.atomic_write`: a crash leaves the old file or the new one); `out` is created if needed."""
    text = json.dumps(to_dict(args), indent=2, ensure_ascii=False) + "\n"
    atomic_write(Path(out) / "args.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Calling a stage from Python


def args_class(command: Any) -> type | None:
    """The arguments dataclass of a command that takes one (`def sft_command(args: SFTArgs)`), else None."""
    hints = typing.get_type_hints(command)
    hints.pop("return", None)
    if len(hints) == 1:
        (cls,) = hints.values()
        if dataclasses.is_dataclass(cls):
            return cls
    return None


def call(command: Any, **values: Any) -> Any:
    """Run a stage from Python with flat keyword arguments, checked as a recipe file is:
    `call(sft_command, init=run / "pretrain", data=[...], out=run / "sft", lr=3e-4)`."""
    cls = args_class(command)
    if cls is None:
        raise TypeError(f"{command.__name__} does not take one arguments dataclass")
    return command(build(cls, values, f"{command.__name__}(...)"))

