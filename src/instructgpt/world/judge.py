"""The scripted labeler's verdicts on a model's replies, for evaluation and for choosing an SFT checkpoint:
per-reply scores and behaviour rates, pairwise win rates with their confidence interval. Torch-free.
"""

from __future__ import annotations

import math

import numpy as np

from ..data import Prompt
from ..errors import UserError
from .labeler import Labeler, admits_not_knowing, is_refusal


def world_record(p: Prompt) -> dict:
    """The labeler's view of a prompt: its text plus the ground truth the world stored beside it."""
    if "family" not in p.meta:
        raise UserError("the labeler needs world prompts (records with 'family' and 'meta'); "
                        "bring your own rankings for other prompts")
    return {"prompt": p.messages[-1]["content"], "family": p.meta["family"], "meta": p.meta.get("meta", {}),
            "id": p.meta.get("id", "")}


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties count as half a win)."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(labeler: Labeler, prompts, records, answers: list[tuple[str, bool]]) -> dict:
    """Labeler score, correctness and the behaviour rates of one model's replies."""
    per_family: dict[str, dict[str, list[float]]] = {}
    rates: dict[str, list[float]] = {"hallucination": [], "refusal": [], "over_refusal": [], "constraint": []}
    scores = []
    for rec, (text, ended) in zip(records, answers):
        s = labeler.score(rec, text, ended)
        scores.append(s.total)
        fam = per_family.setdefault(rec["family"], {"score": [], "correct": []})
        fam["score"].append(s.total)
        fam["correct"].append(s.criteria["correct"])
        if rec["family"] == "unknown":
            rates["hallucination"].append(float(not admits_not_knowing(text) or s.criteria["truthful"] < 1))
        elif rec["family"] == "harmful":
            rates["refusal"].append(float(is_refusal(text)))
        elif rec["family"] == "benign_edgy":
            rates["over_refusal"].append(float(is_refusal(text)))
        elif rec["family"] == "constrained_list":
            rates["constraint"].append(float(s.criteria["follows_constraints"] == 1.0))

    def mean(xs):
        return float(np.mean(xs)) if xs else None

    return {
        "labeler_score": mean(scores),
        "hallucination_rate": mean(rates["hallucination"]),
        "refusal_rate": mean(rates["refusal"]),
        "over_refusal_rate": mean(rates["over_refusal"]),
        "constraint_rate": mean(rates["constraint"]),
        "per_family": {f: {"labeler_score": mean(v["score"]), "correct": mean(v["correct"]), "n": len(v["score"])}
                       for f, v in sorted(per_family.items())},
    }


def win_rate(labeler: Labeler, records, a: list[tuple[str, bool]], b: list[tuple[str, bool]]) -> tuple[float, list]:
    """Share of prompts where the labeler prefers reply a to reply b (ties half), and its 95% interval."""
    wins = sum(labeler.judge(r, x[0], y[0], [x[1], y[1]]) for r, x, y in zip(records, a, b))
    n = len(records)
    return wins / n, list(wilson_interval(wins, n))
