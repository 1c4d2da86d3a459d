"""Verifiable rewards: functions that check a reply against the reference a prompt record carries, instead of
asking a learned reward model (RL with verifiable rewards, as in DeepSeekMath's GRPO and Tulu 3's RLVR).

A reward function scores one reply:

    fn(prompt: list[dict], response: str, record: dict) -> float

`prompt` is the conversation up to the reply (chat messages ending with the user's), `record` the prompt
record's other fields as `data.read_prompts` keeps them in `Prompt.meta`: for a world prompt ``{"family",
"meta", "id"}`` with the ground truth in ``meta``; for GSM8K ``{"answer"}``, the worked answer ending in
``#### number``.

Built in: `WorldChecker` (is the reply to an instruction-world prompt correct, as the world's labeler judges
correctness) and `gsm8k`. `load_reward_fn` turns a `--reward-fn` value into a function, `score_batch` calls one
over a batch and checks what it returns, `combine` adds weighted rewards and, optionally, a reward model.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from numbers import Real
from pathlib import Path

import torch
from torch import Tensor

from .data import gsm8k_final_answer
from .errors import UserError
from .world.labeler import admits_not_knowing, is_refusal, numbers, sentences, words
from .world.world import CATEGORIES, FAMILIES, JOBS, LANDMARKS, World

RewardFn = Callable[[list[dict], str, dict], float]
# A reward model's view of a batch: (prompts, responses) -> (B,) scores.
BatchScorer = Callable[[list[list[dict]], list[str]], Tensor]


# ----------------------------------------------------------------------------------------------------
# The instruction world


class WorldChecker:
    """1.0 when a reply to a world prompt is correct, else 0.0: exactly when the world's labeler gives it full
    marks on its "correct" criterion (`labeler.Labeler.score`), with the labeler's own parsing (first sentence,
    numbers in digits or words, case only where the task is about case). Every family is checkable: the
    capability tasks by their answer, `fact` by the attribute's value and no other, `unknown` by admitting not
    knowing, `harmful` by refusing, `benign_edgy` by helping with every keyword, `constrained_list` by naming
    exactly n words of the category.

    It needs the world for one thing the prompt records lack: the names of its towns, so that a reply naming
    the right town among others ("Bavo lives in Kifoby or Zamere.") is not counted correct.
    """

    def __init__(self, world: World):
        # the values each fact attribute can take, as the labeler reads them
        self.values = {
            "town": {t.lower() for t in world.towns}, "colour": set(CATEGORIES["colours"]),
            "food": set(CATEGORIES["foods"]), "job": set(JOBS), "pet": set(CATEGORIES["animals"]),
            "landmark": set(LANDMARKS),
        }

    def __call__(self, prompt: list[dict], response: str, record: dict) -> float:
        if "family" not in record or "meta" not in record:
            raise UserError("the world reward needs world prompts: records with 'family' and 'meta' "
                            f"(this one has {sorted(record)})")
        return float(self.correct(record["family"], record["meta"], response))

    def correct(self, family: str, meta: dict, response: str) -> bool:
        """Whether `response` answers a prompt of `family` with ground truth `meta` correctly."""
        if family not in FAMILIES:
            raise UserError(f"unknown task family {family!r}; the world's families are {', '.join(FAMILIES)}")
        text = response.strip()
        return bool(text) and getattr(self, f"_{family}")(meta, text)

    def _arithmetic(self, m: dict, text: str) -> bool:
        got = numbers(first_sentence(text))
        return bool(got) and got[-1] == m["answer"]  # "17 + 25 = 42." answers 42

    _count = _arithmetic

    def _reverse(self, m: dict, text: str) -> bool:
        toks = words(first_sentence(text))
        return bool(toks) and toks[-1].lower() == m["answer"]

    def _uppercase(self, m: dict, text: str) -> bool:
        toks = words(first_sentence(text))
        return bool(toks) and toks[-1] == m["answer"]  # the case is the task

    def _sort(self, m: dict, text: str) -> bool:
        return [t.lower() for t in words(first_sentence(text)) if t.lower() != "and"] == m["answer"]

    def _repeat(self, m: dict, text: str) -> bool:
        return [t.lower() for t in words(first_sentence(text))] == [m["word"]] * m["n"]

    def _fact(self, m: dict, text: str) -> bool:
        # the right value and no other value of the attribute anywhere in the reply
        if m["attribute"] == "age":
            return set(numbers(text)) == {m["answer"]}
        found = {t.lower() for t in words(text)} & self.values[m["attribute"]]
        return found == {str(m["answer"]).lower()}

    def _unknown(self, m: dict, text: str) -> bool:
        return admits_not_knowing(text)

    def _harmful(self, m: dict, text: str) -> bool:
        return is_refusal(text)

    def _benign_edgy(self, m: dict, text: str) -> bool:
        low = text.lower()
        return not is_refusal(text) and all(k.lower() in low for k in m["keywords"])

    def _constrained_list(self, m: dict, text: str) -> bool:
        items = [t for t in words(first_sentence(text)) if t.lower() != "and"]
        valid = {t.lower() for t in items} & set(CATEGORIES[m["category"]])
        return len(items) == len(valid) == m["n"]  # n different words of the category and nothing else


def first_sentence(text: str) -> str:
    """The first sentence, where the labeler reads the answer of a capability task."""
    s = sentences(text)
    return s[0] if s else ""


# ----------------------------------------------------------------------------------------------------
# GSM8K

# A number as a reply writes it: "-3", "1,234", "0.5"; a trailing full stop is not a decimal point.
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def gsm8k(prompt: list[dict], response: str, record: dict) -> float:
    """1.0 when the last number in the reply equals the reference's final answer (after ``####`` in
    record["answer"]), compared as numbers ("1,234." and "1234.0" both answer 1234), else 0.0."""
    if not isinstance(record.get("answer"), str):
        raise UserError("the gsm8k reward needs the reference: a string 'answer' ending in '#### number' "
                        f"(the record has {sorted(record)})")
    final = gsm8k_final_answer(record["answer"])
    try:
        want = Decimal(final)
    except InvalidOperation:
        want = Decimal("NaN")
    if not want.is_finite():
        raise UserError(f"the GSM8K final answer {final!r} is not a number")
    got = _NUMBER_RE.findall(response)
    return float(bool(got) and Decimal(got[-1].replace(",", "")) == want)


# ----------------------------------------------------------------------------------------------------
# Calling a reward over a batch


def score_batch(fn: RewardFn, prompts: Sequence[list[dict]], responses: Sequence[str], records: Sequence[dict],
                name: str) -> Tensor:
    """fn on every (prompt, response, record), as a (B,) fp32 tensor. A function that raises, or returns
    anything but a finite number, stops the run with a UserError naming it, the prompt index and the value."""
    if not len(prompts) == len(responses) == len(records):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(records)} records")
    out = []
    for i, (p, r, rec) in enumerate(zip(prompts, responses, records)):
        where = f"prompt {i} ({_last_user(p)!r:.80})"
        try:
            v = fn(p, r, rec)
        except Exception as e:
            raise UserError(f"reward function {name} raised {type(e).__name__} on {where}: {e}") from e
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, Real) and math.isfinite(float(v)):
            out.append(float(v))
            continue
        raise UserError(f"reward function {name} returned {v!r:.80} for {where}; expected a finite number")
    return torch.tensor(out, dtype=torch.float32)


def _last_user(prompt: list[dict]) -> str:
    try:
        return str(prompt[-1]["content"])
    except (IndexError, KeyError, TypeError):
        return str(prompt)


@dataclass
class Combined:
    """A weighted sum of rewards: sum_k w_k * fn_k(prompt, response, record) + w_rm * reward_model(prompt,
    response). Made by `combine`; called on a batch."""

    terms: list[tuple[str, RewardFn, float]]  # (name, function, weight)
    model: tuple[BatchScorer, float] | None = None  # (the reward model's scorer, weight)

    def parts(self, prompts: Sequence[list[dict]], responses: Sequence[str], records: Sequence[dict]
              ) -> dict[str, Tensor]:
        """Each term's unweighted scores (B,), by name; the reward model's under "model"."""
        out = {name: score_batch(fn, prompts, responses, records, name) for name, fn, _ in self.terms}
        if self.model is not None:
            scores = torch.as_tensor(self.model[0](list(prompts), list(responses))).float().cpu()
            if scores.shape != (len(responses),) or not bool(torch.isfinite(scores).all()):
                raise UserError(f"the reward model returned scores of shape {tuple(scores.shape)} for "
                                f"{len(responses)} responses, or a non-finite one: {scores.tolist()!r:.200}")
            out["model"] = scores
        return out

    def __call__(self, prompts: Sequence[list[dict]], responses: Sequence[str], records: Sequence[dict]) -> Tensor:
        """The weighted sum (B,), fp32."""
        parts = self.parts(prompts, responses, records)
        weights = [w for _, _, w in self.terms] + ([self.model[1]] if self.model is not None else [])
        return sum((w * s for w, s in zip(weights, parts.values())), torch.zeros(len(responses)))


def combine(terms: Sequence[tuple[str, RewardFn, float]], model: tuple[BatchScorer, float] | None = None
            ) -> Combined:
    """Weighted rewards as one, e.g. ``combine([(*load_reward_fn("gsm8k"), 1.0)], model=(rm_scores, 0.1))``.

    Args:
        terms: (name, function, weight) of each reward function; names must differ and may not be "model".
        model: optionally a callable scoring a batch, (prompts, responses) -> (B,), and its weight.
    """
    names = [name for name, _, _ in terms]
    if len(set(names)) != len(names) or "model" in names:
        raise ValueError(f"reward names must differ and not be 'model', got {names}")
    if not terms and model is None:
        raise ValueError("combine needs at least one reward")
    return Combined(list(terms), model)


# ----------------------------------------------------------------------------------------------------
# --reward-fn


def load_reward_fn(spec: str, world: World | str | Path | None = None) -> tuple[str, RewardFn]:
    """The reward function a `--reward-fn` value names, and its name for messages:

    - ``world``: `WorldChecker` on the instruction world `world` (a World, or the folder holding world.json);
    - ``gsm8k``: `gsm8k`;
    - ``module:function`` or ``path/to/file.py:function``: your own `fn(prompt, response, record) -> float`;
      modules are also looked up in the current folder.
    """
    if spec == "world":
        if world is None:
            raise UserError("--reward-fn world checks replies against the instruction world: give its folder "
                            "(the one holding world.json) with --world")
        if not isinstance(world, World):
            if not (Path(world) / "world.json").is_file():
                raise UserError(f"--world {world}: no world.json in it; make one with `instructgpt world`")
            world = World.load(world)
        return "world", WorldChecker(world)
    if spec == "gsm8k":
        return "gsm8k", gsm8k
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise UserError(f"--reward-fn must be world, gsm8k, module:function or file.py:function, got {spec!r}")
    try:
        if module.endswith(".py"):
            if not Path(module).is_file():
                raise ImportError(f"no file {module}")
            loader_spec = importlib.util.spec_from_file_location(Path(module).stem, module)
            mod = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(mod)
        else:
            if str(Path.cwd()) not in sys.path and "" not in sys.path:
                sys.path.append(str(Path.cwd()))
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load reward function {spec!r}: {e}") from None
    if not callable(fn):
        raise UserError(f"reward function {spec!r} is not callable")
    return spec, fn
