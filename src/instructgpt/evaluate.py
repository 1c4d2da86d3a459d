"""Evaluation as the paper does it, with the world's labeler in the place of human labelers.

For each model, greedy replies to held-out world prompts, then:
- win rate against the SFT model, judged pairwise by the labeler, with a 95% confidence interval
  (the paper's Figure 1);
- the labeler's score and correctness per task family;
- hallucination on questions the world never answers, refusal of harmful requests and over-refusal of
  benign ones, constraint following (the paper's Figures 4-6 and TruthfulQA / RealToxicity analogues);
- the alignment tax (the paper's performance regressions on public NLP data sets, which PPO-ptx reduces):
  loss on held-out pretraining text, and few-shot accuracy on the world's facts, scored by likelihood as
  GPT-3 scored its multiple-choice benchmarks: after two example sentences, which value of a person's
  town, colour, food, job or pet does the model find likeliest?
- on the capability families (arithmetic, reverse, sort, count, uppercase, repeat: one checkable answer
  each), exact match of the greedy replies by the world's checker (`rewards.WorldChecker`), per family
  with a 95% Wilson interval and their mean with a 95% bootstrap interval; and pass@1 and pass@k of replies
  sampled at temperature 1 (Chen et al.'s unbiased estimator) on a fixed subset of those prompts, the
  figures that RL with verifiable rewards (the pipeline's GRPO stage) is meant to move.
The pretrained model is prompted few-shot in plain text, as the paper prompted GPT-3: before each question,
three questions of the same task family with the labeler's answers (`world_few_shot`; drawn from the world's
training content, never an evaluation prompt's people, words or sums), so that it is shown the form of the
answer asked for.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .batching import IGNORE, pad_labelled, prefix_lm_batch
from .chat import FewShot, render_prompt, replies, reply_text
from .checkpoint import DONE, load_model, read_config, write_json_atomic
from .data import read_prompts
from .distributed import resolve_device
from .errors import UserError
from .generate import SamplingParams, generate_many
from .losses import seq2seq_loss_sum, sequence_logprobs
from .model import GPT, Seq2Seq
from .recipe import write_args
from .records import file_digest, read_json_file
from .rewards import WorldChecker
from .tokenizer import Tokenizer
from .train import Progress
from .world.judge import summarise, wilson_interval, win_rate, world_record
from .world.labeler import Labeler
from .world.world import (
    CAPABILITY_FAMILIES,
    FAMILIES,
    FAVOURITE_COLOURS,
    FAVOURITE_FOODS,
    JOBS,
    PETS,
    World,
    article,
    demonstrate,
    sample_prompt,
    seeded_rng,
)

MODEL_ORDER = ("pretrained", "sft", "ppo", "ppo_ptx", "dpo", "grpo")


@torch.no_grad()
def heldout_loss(model, tok: Tokenizer, text_path: Path, max_windows: int = 64) -> float:
    """Per-token loss on held-out pretraining text, in windows of the model's context: next-token loss
    for a GPT; for an encoder-decoder, the prefix-LM loss of its pretraining (the first half of a window
    in the encoder, the second half predicted by the decoder)."""
    ids = tok.encode(text_path.read_text(encoding="utf-8"))
    T = model.config.block_size
    seq2seq = isinstance(model, Seq2Seq)
    W = 2 * T if seq2seq else T + 1
    starts = list(range(0, max(1, len(ids) - W), W))[:max_windows]
    if not starts or len(ids) < W:
        raise UserError(f"{text_path}: too short for one window of {W} tokens")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(starts), 16):
        rows = np.array([ids[i:i + W] for i in starts[s:s + 16]], dtype=np.int64)
        if seq2seq:
            batch = prefix_lm_batch(rows, np.full(len(rows), T // 2), tok.bos_id, tok.pad_id)
            total += float(seq2seq_loss_sum(model, {k: v.to(device) for k, v in batch.items()}))
            count += batch["labels"].numel()
            continue
        rows_t = torch.from_numpy(rows).to(device)
        logits = model(rows_t[:, :-1]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), rows_t[:, 1:].flatten(), reduction="sum"))
        count += rows_t[:, 1:].numel()
    return total / count


# A fact sentence cut before its value, and the continuation that states the value, in forms the
# pretraining corpus uses.
FACT_CLOZE = {
    "town": ("{n} lives in", " {v}."),
    "colour": ("{n}'s favourite colour is", " {v}."),
    "food": ("{n}'s favourite food is", " {v}."),
    "job": ("{n} works as", " {a} {v}."),
    "pet": ("{n} has a pet", " {v}."),
}


def fact_cloze_items(world: World, shots: int = 2, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """(context, candidate continuations, index of the true one) for every person and attribute of
    FACT_CLOZE: `shots` true sentences of the same form about other people, then the person's sentence cut
    before its value; the candidates are every value of that kind."""
    rng = random.Random(seed)
    options = {"town": sorted(world.towns), "colour": FAVOURITE_COLOURS, "food": FAVOURITE_FOODS, "job": JOBS,
               "pet": PETS}
    items = []
    for p in world.people:
        for attr, (prefix, cont) in FACT_CLOZE.items():
            others = rng.sample([q for q in world.people if q.name != p.name], shots)
            examples = [prefix.format(n=q.name) + cont.format(v=getattr(q, attr), a=article(getattr(q, attr)))
                        for q in others]
            context = " ".join([*examples, prefix.format(n=p.name)])
            items.append((context, [cont.format(v=v, a=article(v)) for v in options[attr]],
                          options[attr].index(getattr(p, attr))))
    return items


@torch.no_grad()
def continuation_logprobs(model, tok: Tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[float]:
    """Mean log-probability per token of each continuation after its context (BOS + context + continuation,
    tokenised in two parts), in right-padded batches scored as DPO scores a reply (`losses.sequence_logprobs`
    over the continuation's labels)."""

    items, lengths = [], []
    for context, cont in pairs:
        c, x = tok.begin + tok.encode(context), tok.encode(cont)
        if len(x) >= model.config.block_size:
            raise ValueError(f"a continuation of {len(x)} tokens leaves no context in a {model.config.block_size}"
                             f"-token window: {cont[:40]!r}")
        ids = (c + x)[-model.config.block_size:]
        start = len(ids) - len(x)
        items.append((ids[:-1], [IGNORE] * (start - 1) + ids[start:]))  # label t: the token after position t
        lengths.append(len(x))
    device = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in pad_labelled(items[s:s + batch_size], tok.pad_id).items()}
        out += (sequence_logprobs(model, batch).cpu() / torch.tensor(lengths[s:s + batch_size])).tolist()
    return out


def fact_cloze_accuracy(model, tok: Tokenizer, items: list[tuple[str, list[str], int]]) -> float:
    """Share of items whose true continuation is the likeliest (mean log-probability per token)."""
    pairs = [(context, cand) for context, cands, _ in items for cand in cands]
    scores = iter(continuation_logprobs(model, tok, pairs))
    right = 0
    for _, cands, truth in items:
        s = [next(scores) for _ in cands]
        right += int(max(range(len(s)), key=s.__getitem__) == truth)
    return right / len(items)


# ----------------------------------------------------------------------------------------------------
# Capability families: exact match and pass@k


@dataclass(frozen=True)
class PassAtK:
    """pass@k's sample: `n` replies at temperature 1 to the first `per_family` prompts of each capability family,
    drawn from a generator seeded with `seed` (the same prompts and seeds for every model)."""

    per_family: int = 8
    n: int = 8
    k: int = 4  # reported beside pass@1
    seed: int = 0


BOOTSTRAP_RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al., 2021, "Evaluating
    Large Language Models Trained on Code", arXiv 2107.03374, equation 1): the chance that k of the n samples,
    drawn without replacement, hold a correct one,

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    (the product form of their numerically stable code; no large binomials)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_interval(groups: list[list[float]], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
                       ) -> list[float]:
    """95% percentile bootstrap interval of the mean over groups of each group's mean, each group resampled
    with replacement on its own (stratified: a family keeps its number of prompts in every resample)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for g in groups:
        x = np.asarray(g, dtype=np.float64)
        means += x[rng.integers(0, len(x), (resamples, len(x)))].mean(1)  # (resamples,)
    lo, hi = np.percentile(means / len(groups), [2.5, 97.5])
    return [float(lo), float(hi)]


def capability_hits(checker: WorldChecker, records: list[dict], texts: list[str]) -> dict[str, list[float]]:
    """{family: 1.0 or 0.0 per reply, in the records' order} for the capability families present, in
    CAPABILITY_FAMILIES' order: what the world's checker makes of each reply."""
    hits: dict[str, list[float]] = {}
    for rec, text in zip(records, texts):
        if rec["family"] in CAPABILITY_FAMILIES:
            hits.setdefault(rec["family"], []).append(float(checker.correct(rec["family"], rec["meta"], text)))
    return {f: hits[f] for f in CAPABILITY_FAMILIES if f in hits}


def exact_match(checker: WorldChecker, records: list[dict], texts: list[str], seed: int = 0) -> dict | None:
    """Exact match of replies to the capability families' prompts, as the world's checker judges them:
    {"per_family": {family: {"n", "correct", "rate", "ci95" (Wilson)}}, "mean": {"rate", "ci95" (stratified
    bootstrap)}}, the mean taken over families (each counts the same). None without such prompts."""
    hits = capability_hits(checker, records, texts)
    if not hits:
        return None
    groups = list(hits.values())
    per_family = {f: {"n": len(h), "correct": int(sum(h)), "rate": float(np.mean(h)),
                      "ci95": list(wilson_interval(sum(h), len(h)))} for f, h in hits.items()}
    mean = float(np.mean([np.mean(g) for g in groups]))
    return {"per_family": per_family, "mean": {"rate": mean, "ci95": bootstrap_interval(groups, seed)}}


def exact_match_change(checker: WorldChecker, records: list[dict], texts: list[str], base_texts: list[str],
                       seed: int = 0) -> dict | None:
    """The change in mean exact match (over the capability families) from the replies `base_texts` to `texts`
    to the same prompts: {"diff", "ci95"}, the interval a paired 95% percentile bootstrap (each resample draws
    the same prompts for both, within each family), which is the stratified bootstrap of the per-prompt
    differences. None without capability prompts."""
    hits, base_hits = capability_hits(checker, records, texts), capability_hits(checker, records, base_texts)
    if not hits:
        return None
    groups = [list(np.subtract(hits[f], base_hits[f])) for f in hits]
    return {"diff": float(np.mean([np.mean(g) for g in groups])), "ci95": bootstrap_interval(groups, seed)}


def pass_subset(records: list[dict], per_family: int) -> list[int]:
    """The indices of the first `per_family` prompts of each capability family, in the file's order."""
    taken: dict[str, int] = {}
    out = []
    for i, rec in enumerate(records):
        if rec["family"] in CAPABILITY_FAMILIES and taken.get(rec["family"], 0) < per_family:
            taken[rec["family"]] = taken.get(rec["family"], 0) + 1
            out.append(i)
    return out


FEW_SHOT_EXAMPLES = 3  # per family: what fits the tiny preset's 128-token window with the question and the reply


def world_few_shot(world: World, n: int = FEW_SHOT_EXAMPLES) -> FewShot:
    """The pretrained model's prompts: for each task family, `n` questions of that family drawn from the world's
    training content (`sample_prompt(..., heldout=False)`, a generator of their own: the same for a seed) with
    the labeler's own answers (`demonstrate`, no demonstrator habits)."""
    by_family = {}
    for family in FAMILIES:
        rng = seeded_rng(world.seed, "few-shot examples", family)
        records = [sample_prompt(world, family, rng, heldout=False) for _ in range(n)]
        by_family[family] = tuple((r["prompt"], demonstrate(world, r)) for r in records)
    return FewShot(by_family)


@torch.no_grad()
def sampled_replies(model, tok: Tokenizer, prompts: list, few_shot: FewShot | None, max_new_tokens: int, n: int,
                    seed: int, batch_size: int) -> list[list[str]]:
    """n replies to each prompt sampled at temperature 1, prompted as `chat.replies` prompts (few-shot replies
    cut at the first newline). Continuous batching (`generate.generate_many`, at least a prompt's n samples at
    once): a prompt's samples draw from a generator seeded from `seed` and the prompt's place in the list,
    whatever else shares its batch."""
    block = model.config.block_size
    ids = [(tok.begin + tok.encode(few_shot.text(p)) if few_shot is not None
            else render_prompt(tok, p.messages))[-(block - max_new_tokens):] for p in prompts]
    gen = generate_many(model, ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0), tok.stop_ids,
                        tok.pad_id, max_batch=max(batch_size, n), n=n, generator=torch.Generator().manual_seed(seed),
                        start_id=tok.bos_id)
    # (len(prompts) * n), a prompt's n side by side
    texts = [tok.decode(t) if few_shot is not None else reply_text(tok, t) for t in gen.token_lists()]
    texts = [(t.split("\n", 1)[0] if few_shot is not None else t).strip() for t in texts]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def pass_at_k_figures(checker: WorldChecker, records: list[dict], samples: list[list[str]], k: int, seed: int = 0
                      ) -> dict:
    """{"prompts", "samples" (n), "pass@1" and "pass@k": {"rate", "ci95" (bootstrap over prompts)}} of n
    sampled replies to each of `records` (capability prompts)."""
    n = len(samples[0])
    correct = [sum(checker.correct(r["family"], r["meta"], t) for t in texts) for r, texts in zip(records, samples)]
    out: dict = {"prompts": len(records), "samples": n}
    for kk in sorted({1, k}):
        values = [pass_at_k(n, c, kk) for c in correct]
        out[f"pass@{kk}"] = {"rate": float(np.mean(values)), "ci95": bootstrap_interval([values], seed)}
    return out


def evaluate_models(models: dict[str, Path], world: Path, prompts: Path, heldout_text: Path | None,
                    max_new_tokens: int = 48, batch_size: int = 64, max_prompts: int | None = None,
                    device: str = "auto", seed: int = 0, cache: Path | None = None,
                    sampling: PassAtK | None = PassAtK()) -> dict:
    """Every figure of the evaluation for the given {name: checkpoint folder}; "sft" must be among them.
    `sampling`: pass@k's sample of the capability prompts (None: no pass@k).

    `cache`: a folder of each model's figures and replies, keyed by everything they depend on (the model's
    files, the prompts, the world, the held-out text, the settings), so that a rerun (after a crash, or after
    one stage was trained again) evaluates only the models whose key changed. Win rates are judged afresh from
    the replies: the labeler's verdicts depend only on the texts, so the results are those of a full run."""
    if "sft" not in models:
        raise UserError("the evaluation compares every model with the SFT model: give an 'sft' checkpoint")
    dev = resolve_device(device)
    labeler = Labeler.load(world, seed=seed)
    items = list(read_prompts(prompts))[:max_prompts]
    records = [world_record(p) for p in items]
    unknown = next(((n, r["family"]) for n, r in enumerate(records, 1) if r["family"] not in FAMILIES), None)
    if unknown:
        raise UserError(f"--prompts {prompts}: prompt {unknown[0]} has the task family {unknown[1]!r}, which the "
                        f"labeler does not know ({', '.join(FAMILIES)})")
    cloze = fact_cloze_items(labeler.world, seed=seed)
    checker = WorldChecker(labeler.world)
    few_shot = world_few_shot(labeler.world)
    settings = {"prompts": file_digest(prompts), "world": file_digest(Path(world) / "world.json"),
                "few_shot": hashlib.blake2b(json.dumps(few_shot.by_family).encode(), digest_size=16).hexdigest(),
                "heldout": None if heldout_text is None else file_digest(heldout_text),
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "max_prompts": max_prompts, "seed": seed,
                "device": dev.type, "pass_at_k": None if sampling is None else vars(sampling)}
    capability = Capability(checker, sampling, pass_subset(records, sampling.per_family) if sampling else [], seed)
    answers: dict[str, list[tuple[str, bool]]] = {}
    results: dict[str, dict] = {}
    for name, folder in models.items():
        folder = Path(folder)
        key = {"model": name, **{f: file_digest(folder / f) for f in MODEL_FILES}, **settings}
        entry = read_cached(cache, name, key)
        if entry is None:
            entry = {"key": key, **evaluate_model(name, folder, items, records, labeler, cloze, heldout_text,
                                                  max_new_tokens, batch_size, dev, capability,
                                                  few_shot if name == "pretrained" else None)}
            if cache is not None:
                write_json_atomic(cache / f"{name}.json", entry)
        results[name] = entry["figures"]
        answers[name] = [(text, ended) for text, ended in entry["answers"]]
    for name in models:
        if name == "sft":
            results[name]["win_rate_vs_sft"], results[name]["win_rate_ci95"] = 0.5, [0.5, 0.5]
        else:
            results[name]["win_rate_vs_sft"], results[name]["win_rate_ci95"] = win_rate(
                labeler, records, answers[name], answers["sft"])
            if results[name].get("exact_match") is not None:
                results[name]["exact_match"]["vs_sft"] = exact_match_change(
                    checker, records, [t for t, _ in answers[name]], [t for t, _ in answers["sft"]], seed)
    samples = [{"prompt": r["prompt"], "family": r["family"], **{m: answers[m][i][0] for m in models}}
               for i, r in enumerate(records)]
    chance = float(np.mean([1 / len(cands) for _, cands, _ in cloze]))
    return {"models": results, "samples": samples, "prompts": len(items), "few_shot_chance": chance,
            "capability": capability.describe()}


MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")  # what a model's figures depend on


@dataclass
class Capability:
    """What the capability figures of every model share: the checker, pass@k's settings and its prompts (indices
    into the evaluation's prompts)."""

    checker: WorldChecker
    sampling: PassAtK | None
    subset: list[int]
    seed: int  # of the bootstrap intervals

    def describe(self) -> dict:
        """How the figures were made, for results.json."""
        out = {"families": list(CAPABILITY_FAMILIES), "exact_match": "greedy replies checked by the world's checker; "
               "95% Wilson interval per family, 95% percentile bootstrap (stratified by family, "
               f"{BOOTSTRAP_RESAMPLES} resamples) for the mean over families; vs_sft: the change of the mean from "
               "SFT's, with a paired bootstrap interval (the same prompts drawn for both)"}
        if self.sampling is not None and self.subset:
            out["pass_at_k"] = {**vars(self.sampling), "prompts": len(self.subset), "temperature": 1.0,
                                "interval": f"95% percentile bootstrap over prompts, {BOOTSTRAP_RESAMPLES} resamples"}
        return out


def evaluate_model(name: str, folder: Path, items: list, records: list[dict], labeler: Labeler, cloze: list,
                   heldout_text: Path | None, max_new_tokens: int, batch_size: int, dev: torch.device,
                   capability: Capability, few_shot: FewShot | None = None) -> dict:
    """{"figures": one model's labeler figures, held-out loss, few-shot accuracy, exact match and pass@k,
    "answers": its greedy (text, ended) replies}. `few_shot`: how a pretrained model is prompted (None: the
    chat format)."""
    tok = Tokenizer.load(folder / "tokenizer.json")
    model = load_model(folder, device=dev).eval()
    progress = Progress(len(items), f"eval {name}")
    answers = replies(model, tok, items, few_shot, max_new_tokens, batch_size, progress)
    progress.close()
    figures = summarise(labeler, items, records, answers)
    if heldout_text is not None:
        figures["pretrain_val_loss"] = heldout_loss(model, tok, Path(heldout_text))
    figures["few_shot_accuracy"] = fact_cloze_accuracy(model, tok, cloze) if isinstance(model, GPT) else None
    figures["exact_match"] = exact_match(capability.checker, records, [text for text, _ in answers], capability.seed)
    figures["pass_at_k"] = None
    if capability.sampling is not None and capability.subset:
        s = capability.sampling
        samples = sampled_replies(model, tok, [items[i] for i in capability.subset], few_shot, max_new_tokens, s.n,
                                  s.seed, batch_size)
        figures["pass_at_k"] = pass_at_k_figures(capability.checker, [records[i] for i in capability.subset],
                                                 samples, s.k, capability.seed)
    return {"figures": figures, "answers": answers}


def read_cached(cache: Path | None, name: str, key: dict) -> dict | None:
    """The cached entry of a model when its key is `key`; None when there is none, or it is of other inputs."""
    path = None if cache is None else cache / f"{name}.json"
    if path is None or not path.is_file():
        return None
    try:
        entry = read_json_file(path)
    except UserError as e:  # only a cache: evaluated again, and rewritten
        print(f"[eval] {name}: ignoring the cached figures ({e})")
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == key else None


@dataclass
class EvalArgs:
    """The arguments of `instructgpt eval`: flags, or the keys of a --config recipe file."""

    run: Path  # the run folder (as `instructgpt pipeline` lays it out)
    world: Path | None = None  # the world folder; None: RUN/world
    prompts: Path | None = None  # held-out prompts; None: WORLD/prompts_eval.jsonl
    # results file; None: RUN/eval/results.json (args.json and cache/, each model's figures, are written beside it)
    out: Path | None = None
    max_new_tokens: int = 48  # longest reply, in tokens (greedy)
    max_prompts: int | None = None  # evaluate on the first this many prompts; None: all of them
    batch_size: int = 64  # prompts per batch of greedy replies
    # pass@k on the capability families: --pass-n replies sampled at temperature 1 to the first --pass-prompts
    # prompts of each family (0: no pass@k); pass@1 and pass@--pass-k are reported
    pass_prompts: int = 8
    pass_n: int = 8
    pass_k: int = 4
    # seeds the labeler's judgements, draws the few-shot examples, pass@k's samples and the bootstrap intervals.
    # 0, not the training stages' 1337: the pipeline's figures (its --seed defaults to 0) depend on it
    seed: int = 0
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or auto = cuda if available else cpu


@dataclass
class EvalInputs:
    """The resolved paths of an evaluation: what it reads and where it writes."""

    world: Path
    prompts: Path
    out: Path  # the results file
    models: dict[str, Path]  # {name in MODEL_ORDER: finished stage folder (its done.json written)}
    heldout: Path | None  # held-out pretraining text (WORLD/corpus_heldout.txt), when the world has it


STAGE_DIRS = {"pretrained": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx", "dpo": "dpo", "grpo": "grpo"}


def resolve_inputs(args: EvalArgs) -> EvalInputs:
    """The defaults of the paths filled in, the run's finished models found (a stage's done.json, not only its
    model: a stage that is being run or resumed again keeps its previous export until it is done). A missing
    world or prompts file, or a run without a finished SFT model (every model is compared with it), is a user
    error, before anything is written."""
    run = Path(args.run)
    world = Path(args.world or run / "world")
    prompts = Path(args.prompts or world / "prompts_eval.jsonl")
    if not (world / "world.json").is_file():
        raise UserError(f"--world {world}: no world.json there (made by `instructgpt world`)")
    if not prompts.is_file():
        raise UserError(f"--prompts {prompts}: no such file")
    found = {name: run / d for name, d in STAGE_DIRS.items() if (run / d / "model.safetensors").exists()}
    models = {name: folder for name, folder in found.items() if (folder / DONE).is_file()}
    for name in found.keys() - models.keys():
        print(f"[eval] {name}: left out, not finished ({found[name] / DONE} missing)")
    if "sft" not in models:
        raise UserError(f"--run {run}: no finished SFT model ({run / 'sft' / DONE}); the evaluation compares every "
                        "model with it")
    for folder in models.values():
        block = read_config(folder)["model"]["block_size"]
        if not 1 <= args.max_new_tokens < block:
            raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1 and leave room for a prompt "
                            f"in {folder}'s context of {block} tokens")
    if args.pass_prompts < 0 or args.pass_n < 1 or not 1 <= args.pass_k <= args.pass_n:
        raise UserError(f"--pass-prompts {args.pass_prompts}, --pass-n {args.pass_n}, --pass-k {args.pass_k}: "
                        "need --pass-prompts >= 0 and 1 <= --pass-k <= --pass-n (pass@k draws k of n samples)")
    heldout = world / "corpus_heldout.txt"
    return EvalInputs(world, prompts, Path(args.out or run / "eval" / "results.json"), models,
                      heldout if heldout.exists() else None)


def eval_command(args: EvalArgs) -> dict:
    """Evaluate every finished model of a run folder (pretrain, sft, ppo, ppo_ptx, dpo, grpo) on held-out world
    prompts.

    Writes RUN/eval/results.json (or --out) with args.json beside it and prints a table; returns the results.
    Each model's figures are kept in cache/ beside the results: a rerun evaluates only what is missing or changed.
    """
    t0 = time.time()
    # 1. the inputs, and the arguments beside the results
    inputs = resolve_inputs(args)
    write_args(inputs.out.parent, args)

    # 2. every figure of every model
    sampling = PassAtK(args.pass_prompts, args.pass_n, args.pass_k, args.seed) if args.pass_prompts else None
    res = evaluate_models(inputs.models, inputs.world, inputs.prompts, inputs.heldout, args.max_new_tokens,
                          args.batch_size, args.max_prompts, args.device, args.seed, cache=inputs.out.parent / "cache",
                          sampling=sampling)

    # 3. the reward model's held-out accuracy from its summary; results.json, atomically (no timing in it: the
    # same inputs give the same file)
    rm_done = Path(args.run) / "rm" / DONE
    rm_acc = read_json_file(rm_done).get("val_accuracy") if rm_done.is_file() else None
    results = {"rm": {"accuracy": rm_acc}, **res}
    write_json_atomic(inputs.out, results)
    print_table(results)
    print(f"[eval] {len(inputs.models)} models in {time.time() - t0:.1f} s: {inputs.out}")
    return results


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Evaluation on held-out world prompts")
    cols = ["model", "win vs SFT (95% CI)", "labeler score", "hallucination", "refusal", "over-refusal",
            "constraints", "pretrain loss", "few-shot acc"]
    for c in cols:
        table.add_column(c, justify="right" if c != "model" else "left")

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for name in MODEL_ORDER:
        m = results["models"].get(name)
        if m is None:
            continue
        lo, hi = m["win_rate_ci95"]
        table.add_row(name, f"{m['win_rate_vs_sft']:.3f} [{lo:.2f}, {hi:.2f}]", f(m["labeler_score"]),
                      f(m["hallucination_rate"]), f(m["refusal_rate"]), f(m["over_refusal_rate"]),
                      f(m["constraint_rate"]), f(m.get("pretrain_val_loss")), f(m.get("few_shot_accuracy")))
    Console().print(table)
    rows = [(name, results["models"][name]) for name in MODEL_ORDER
            if (results["models"].get(name) or {}).get("exact_match") is not None]
    if not rows:
        return
    families = [f for f in CAPABILITY_FAMILIES if f in rows[0][1]["exact_match"]["per_family"]]
    passes = sorted({k for _, m in rows for k in (m.get("pass_at_k") or {}) if k.startswith("pass@")},
                    key=lambda k: int(k.removeprefix("pass@")))
    table = Table(title="Capability families: exact match (greedy), pass@k (sampled)")
    for c in ["model", *families, "mean (95% CI)", *passes]:
        table.add_column(c, justify="right" if c != "model" else "left")
    for name, m in rows:
        em, pk = m["exact_match"], m.get("pass_at_k") or {}
        lo, hi = em["mean"]["ci95"]
        table.add_row(name, *(f(em["per_family"].get(fam, {}).get("rate")) for fam in families),
                      f"{em['mean']['rate']:.3f} [{lo:.2f}, {hi:.2f}]", *(f(pk.get(k, {}).get("rate")) for k in passes))
    Console().print(table)
