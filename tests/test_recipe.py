"""Recipes: a stage's arguments from a YAML or TOML file and the command line, flat or nested keys, strict types,
clear errors, and OUT/args.json that reads back to the same arguments."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest
import tyro

from instructgpt.errors import UserError
from instructgpt.recipe import build, flag_paths, parse_args, read_recipe_file, to_dict, write_args


@dataclass
class Train:
    lr: float = 3e-4
    batch_size: int = 16
    seed: int = 1337
    device: str = "auto"
    min_lr: float | None = None


@dataclass
class Args:
    """Fine-tune a model."""

    init: Path
    data: list[Path]
    out: Path = Path("out")
    mode: Literal["loss", "labeler"] = "loss"
    packing: bool = False
    train: Train = field(default_factory=lambda: Train(lr=1e-5))


@dataclass
class Shapes:
    dims: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (0, "a")
    tag: Annotated[str, tyro.conf.arg(help="a tyro marker in the annotation")] = "x"


@dataclass
class Clash:
    seed: int = 0
    train: Train = field(default_factory=Train)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_flag_paths_descend_into_nested_dataclasses():
    paths = flag_paths(Args)
    assert paths["lr"] == ("train", "lr")
    assert paths["batch_size"] == ("train", "batch_size")
    assert paths["init"] == ("init",)
    assert "train" not in paths
    assert set(paths) == {"init", "data", "out", "mode", "packing", "lr", "batch_size", "seed", "device", "min_lr"}


def test_flag_paths_reject_a_flat_name_used_twice():
    with pytest.raises(TypeError, match="seed"):
        flag_paths(Clash)


def test_build_flat_nested_and_mixed_keys_with_dashes_or_underscores():
    flat = build(Args, {"init": "ckpt", "data": ["a.jsonl"], "lr": 1e-3, "batch-size": 8}, "flat.yaml")
    nested = build(Args, {"init": "ckpt", "data": ["a.jsonl"], "train": {"lr": 1e-3, "batch_size": 8}}, "n.yaml")
    mixed = build(Args, {"init": "ckpt", "data": ["a.jsonl"], "lr": 1e-3, "train": {"batch-size": 8}}, "m.yaml")
    assert flat == nested == mixed
    assert flat.train == Train(lr=1e-3, batch_size=8)
    assert flat.init == Path("ckpt") and flat.data == [Path("a.jsonl")]


def test_build_converts_values_to_the_annotation():
    args = build(Args, {"init": "m", "data": ["a", "b"], "lr": 1, "min_lr": 0, "mode": "labeler"}, "r.yaml")
    assert isinstance(args.train.lr, float) and args.train.lr == 1.0
    assert isinstance(args.train.min_lr, float)
    assert all(isinstance(p, Path) for p in args.data)
    assert args.mode == "labeler"
    shapes = build(Shapes, {"dims": [3, 4, 5], "pair": [1, "b"], "tag": "y"}, "s.yaml")
    assert shapes == Shapes(dims=(3, 4, 5), pair=(1, "b"), tag="y")
    assert isinstance(shapes.dims, tuple)


def test_the_same_field_set_twice_is_an_error():
    with pytest.raises(UserError, match="twice"):
        build(Args, {"lr": 1e-3, "train": {"lr": 2e-3}}, "r.yaml", partial=True)
    with pytest.raises(UserError, match="twice"):
        build(Args, {"batch-size": 1, "batch_size": 2}, "r.yaml", partial=True)


def test_misspelled_key_names_the_key_the_file_and_the_closest_flag(tmp_path):
    recipe = write(tmp_path / "recipe.yaml", "init: m\ndata: [a]\nlrr: 1.0e-3\n")
    with pytest.raises(UserError) as e:
        parse_args(Args, ["--config", str(recipe)], prog="instructgpt sft")
    message = str(e.value)
    assert "'lrr'" in message and "recipe.yaml" in message and "did you mean 'lr'" in message


def test_misspelled_key_in_a_section():
    with pytest.raises(UserError, match=r"'bach_size' in the section 'train'.*'batch_size'"):
        build(Args, {"train": {"bach_size": 3}}, "r.toml", partial=True)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("batch_size", "16", "int"),
        ("batch_size", True, "int"),
        ("batch_size", 1.5, "int"),
        ("lr", True, "float"),
        ("packing", 1, "bool"),
        ("device", 0, "str"),
        ("mode", "ppo", "'loss' or 'labeler'"),
        ("min_lr", "small", "float or None"),
        ("init", 3, "Path"),
    ],
)
def test_wrong_types_name_the_key_the_file_and_both_types(key, value, expected):
    with pytest.raises(UserError) as e:
        build(Args, {key: value}, "recipe.yaml", partial=True)
    message = str(e.value)
    assert f"'{key}'" in message and "recipe.yaml" in message and expected in message
    assert type(value).__name__ in message


def test_wrong_element_in_a_list_names_its_index():
    with pytest.raises(UserError, match=r"'data\[1\]'"):
        build(Args, {"data": ["a", 2]}, "r.yaml", partial=True)
    with pytest.raises(UserError, match="'pair'"):
        build(Shapes, {"pair": [1, "b", 3]}, "r.yaml")


def test_a_section_must_be_a_mapping():
    with pytest.raises(UserError, match="'train'.*mapping"):
        build(Args, {"train": 3}, "r.yaml", partial=True)


def test_required_fields_missing_everywhere():
    with pytest.raises(UserError, match="--init, --data"):
        build(Args, {}, "r.yaml")
    partial = build(Args, {"data": ["a"]}, "r.yaml", partial=True)
    assert partial.init is tyro.MISSING and partial.data == [Path("a")]


def test_per_instance_defaults_of_nested_fields_are_kept():
    assert build(Args, {"seed": 7}, "r.yaml", partial=True).train == Train(lr=1e-5, seed=7)
    assert build(Args, {"lr": 2e-4}, "r.yaml", partial=True).train.lr == 2e-4


def test_build_on_a_base_leaves_the_base_alone():
    base = build(Args, {"init": "m", "data": ["a"], "seed": 3}, "base.yaml")
    before = to_dict(base)
    args = build(Args, {"lr": 0.5}, "over.yaml", base=base)
    assert to_dict(base) == before
    assert args.train is not base.train and args.data is not base.data
    assert args.train == Train(lr=0.5, seed=3) and args.init == Path("m")
    args.data.append(Path("b"))
    args.train.seed = 9
    assert base.data == [Path("a")] and base.train.seed == 3


def test_defaults_are_not_shared_between_builds():
    one = build(Args, {}, "a.yaml", partial=True)
    two = build(Args, {}, "b.yaml", partial=True)
    one.train.lr = 1.0
    assert two.train.lr == 1e-5
    assert Args(init=Path("m"), data=[]).train.lr == 1e-5


def test_read_yaml_and_toml(tmp_path):
    yaml_file = write(tmp_path / "r.yml", "init: m\ndata: [a, b]\nlr: 3e-4\ntrain:\n  batch-size: 4\n")
    toml_file = write(tmp_path / "r.toml", 'init = "m"\ndata = ["a", "b"]\nlr = 3e-4\n[train]\nbatch-size = 4\n')
    from_yaml = read_recipe_file(yaml_file)
    assert from_yaml["lr"] == 3e-4  # YAML 1.1 would read `3e-4` (no dot) as a string
    assert build(Args, from_yaml, "r.yml") == build(Args, read_recipe_file(toml_file), "r.toml")


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        read_recipe_file(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match=r"r\.ini.*\.yaml, \.yml, \.toml or \.json"):
        read_recipe_file(write(tmp_path / "r.ini", "[a]"))
    with pytest.raises(UserError, match=r"list\.yaml.*mapping.*not a list"):
        read_recipe_file(write(tmp_path / "list.yaml", "- lr: 1\n- seed: 2\n"))
    with pytest.raises(UserError, match=r"bad\.toml.*line 2"):
        read_recipe_file(write(tmp_path / "bad.toml", 'init = "m"\nlr = = 3\n'))
    with pytest.raises(UserError, match=r"twice\.yaml:3.*'lr' twice"):
        read_recipe_file(write(tmp_path / "twice.yaml", "lr: 1.0\nseed: 1\nlr: 2.0\n"))
    assert read_recipe_file(write(tmp_path / "empty.yaml", "# nothing set\n")) == {}


def test_yaml_parse_error_names_the_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "init: m\ndata: [a, b\nlr: 1.0\n")
    with pytest.raises(UserError) as e:
        read_recipe_file(bad)
    assert "bad.yaml:" in str(e.value)
    line = int(str(e.value).split("bad.yaml:")[1].split(":")[0])
    assert line in (3, 4)  # the unclosed list is noticed where the next key starts


def test_parse_args_flag_overrides_the_file(tmp_path):
    recipe = write(tmp_path / "recipe.yaml", "init: m\ndata: [a, b]\nlr: 1.0e-3\nseed: 5\npacking: true\n")
    args = parse_args(Args, ["--config", str(recipe), "--lr", "3e-4"], prog="instructgpt sft")
    assert args.train.lr == 3e-4
    assert args.train.seed == 5 and args.packing is True
    assert args.init == Path("m") and args.data == [Path("a"), Path("b")]
    assert args.train.batch_size == 16


def test_parse_args_without_flags_takes_the_file(tmp_path):
    recipe = write(tmp_path / "recipe.toml", 'init = "m"\ndata = ["a"]\nmode = "labeler"\n[train]\nmin_lr = 1e-6\n')
    args = parse_args(Args, [f"--config={recipe}"], prog="instructgpt sft")
    assert args == Args(init=Path("m"), data=[Path("a")], mode="labeler", train=Train(lr=1e-5, min_lr=1e-6))


def test_parse_args_without_a_file():
    args = parse_args(Args, ["--init", "m", "--data", "a", "b", "--batch-size", "2", "--no-packing"], prog="x")
    assert args == Args(init=Path("m"), data=[Path("a"), Path("b")], train=Train(lr=1e-5, batch_size=2))


def test_required_fields_from_the_file_are_not_required_flags(tmp_path, capsys):
    recipe = write(tmp_path / "recipe.yaml", "data: [a]\n")
    args = parse_args(Args, ["--config", str(recipe), "--init", "m"], prog="instructgpt sft")
    assert args.init == Path("m") and args.data == [Path("a")]
    with pytest.raises(SystemExit) as e:
        parse_args(Args, ["--config", str(recipe)], prog="instructgpt sft")
    assert e.value.code != 0
    assert "--init" in capsys.readouterr().err


def test_config_flag_errors(tmp_path):
    recipe = write(tmp_path / "recipe.yaml", "init: m\ndata: [a]\n")
    with pytest.raises(UserError, match="needs a file"):
        parse_args(Args, ["--init", "m", "--config"], prog="x")
    with pytest.raises(UserError, match="needs a file"):
        parse_args(Args, ["--config", "--lr", "1"], prog="x")
    with pytest.raises(UserError, match="twice"):
        parse_args(Args, ["--config", str(recipe), f"--config={recipe}"], prog="x")


def test_help_mentions_the_recipe_file(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, ["--help"], prog="instructgpt sft")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Fine-tune a model." in out
    assert "--config FILE" in out and "YAML or TOML" in out and "override the file" in out
    assert "--batch-size" in out and "--train.lr" not in out


def test_to_dict_and_build_round_trip(tmp_path):
    args = Args(init=Path("m"), data=[Path("a"), Path("b")], mode="labeler", train=Train(lr=2e-4, min_lr=1e-6))
    plain = to_dict(args)
    assert plain["init"] == "m" and plain["data"] == ["a", "b"] and plain["train"]["lr"] == 2e-4
    assert build(Args, plain, "args.json") == args
    write_args(tmp_path, args)  # an args.json is itself a recipe file
    assert build(Args, read_recipe_file(tmp_path / "args.json"), "args.json") == args
    shapes = Shapes(dims=(4, 5), pair=(2, "z"))
    assert to_dict(shapes)["dims"] == [4, 5]
    assert build(Shapes, json.loads(json.dumps(to_dict(shapes))), "args.json") == shapes


def test_write_args_is_valid_json_written_atomically(tmp_path):
    args = Args(init=Path("m"), data=[Path("a")])
    out = tmp_path / "run" / "sft"
    write_args(out, args)
    write_args(out, dataclasses.replace(args, packing=True))  # replaces the first
    assert sorted(p.name for p in out.iterdir()) == ["args.json"]
    read = json.loads((out / "args.json").read_text(encoding="utf-8"))
    assert read["packing"] is True
    assert build(Args, read, "args.json") == dataclasses.replace(args, packing=True)
