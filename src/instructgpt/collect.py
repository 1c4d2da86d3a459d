"""Comparison collection: sample K responses per prompt from a policy and have the labeler rank them.

In the paper, labelers ranked K = 4..9 outputs of the models for each prompt; here the world's scripted
labeler plays them. The output is a rankings file ({"prompt", "completions", "ranking"}), the same format
a user brings, so `instructgpt rm` cannot tell who ranked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .chat import render_prompt
from .checkpoint import atomic_write, load_model
from .data import Prompt, read_prompts, write_jsonl
from .distributed import resolve_device
from .errors import UserError
from .generate import SamplingParams, generate
from .recipe import to_dict
from .tokenizer import Tokenizer
from .train import Progress
from .world.judge import world_record
from .world.labeler import Labeler


def sample_responses(model, tok: Tokenizer, prompts: list[Prompt], k: list[int], params: SamplingParams,
                     batch_size: int, generator: torch.Generator, progress: Progress | None = None,
                     start: int = 0) -> list[list[tuple[str, bool]]]:
    """k[i] sampled (text, ended) responses for each prompt (temperature 1 by default), generated in
    batches of `batch_size` rows (one row per response; a prompt's copies share batches)."""
    rows = [(i, render_prompt(tok, p.messages)) for i, p in enumerate(prompts) for _ in range(k[i])]
    out: list[list[tuple[str, bool]]] = [[] for _ in prompts]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        gen = generate(model, [ids for _, ids in chunk], params, tok.eos_id, tok.pad_id, generator,
                       start_id=tok.bos_id)
        for (i, _), ids, ended in zip(chunk, gen.token_lists(), gen.ended.tolist()):
            out[i].append((tok.decode(ids), ended))
        if progress:
            progress.update(start + min(s + batch_size, len(rows)))
    return out


@dataclass
class CollectArgs:
    init: Path  # the model to sample from (the paper sampled from its SFT and later models)
    prompts: Path  # prompt file (world prompts carry the ground truth the labeler needs)
    out: Path  # rankings file (JSONL) to write, atomically; its arguments go beside it, to OUT.args.json
    world: Path  # the world folder whose labeler ranks the responses
    k_min: int = 4  # fewest responses per prompt (the paper: 4)
    k_max: int = 9  # most responses per prompt (the paper: 9); each prompt's K is drawn uniformly in between
    temperature: float = 1.0  # sampling temperature (1: the policy's own distribution)
    top_p: float = 1.0  # nucleus sampling threshold (1: off)
    max_new_tokens: int = 48  # a reply cut at this length is kept, flagged "ended": false
    max_prompts: int | None = None  # use only the first this many prompts; None: all of them
    resample_rounds: int = 3  # extra sampling rounds for prompts that lost replies to emptiness
    batch_size: int = 64  # rows (prompt copies) generated together
    seed: int = 1337  # seeds K, the sampling and the labeler's noise
    device: str = "auto"  # auto, cpu, cuda or cuda:N


def collect_command(args: CollectArgs) -> dict:
    """Sample K (between k_min and k_max) responses per prompt and write the labeler's rankings.

    Empty (or whitespace-only) replies cannot be ranked: they are dropped, counted, and sampled again
    (up to resample_rounds more times); a prompt still short of k_min replies is dropped and counted.
    """
    t0 = time.time()
    check_args(args)

    # 1. read everything first (a foreign prompt file fails here), then note the arguments beside OUT
    c = set_up(args)
    write_args_beside(args.out, args)

    # 2. sample k[i] replies per prompt; replace empty ones in further rounds
    kept, sampled, empty = sample_all(args, c)

    # 3. the labeler ranks each prompt's replies; the rankings file is written whole
    rows, short = rank_all(args, c, kept)
    write_jsonl(args.out, rows)
    sizes = [len(r["completions"]) for r in rows]
    summary = {"stage": "collect", "prompts": len(rows), "completions": sum(sizes),
               "comparisons": sum(n * (n - 1) // 2 for n in sizes), "sampled": sampled,
               "empty_replies_dropped": empty, "prompts_dropped": short,
               "unended": sum(not e for r in rows for e in r["ended"]), "seconds": round(time.time() - t0, 2)}
    print(json.dumps(summary))
    return summary


def check_args(args: CollectArgs) -> None:
    """Every mistake in the flags, before anything is read or written."""
    if not 2 <= args.k_min <= args.k_max:
        raise UserError(f"need 2 <= --k-min <= --k-max, got {args.k_min} and {args.k_max}")
    if args.resample_rounds < 0:
        raise UserError(f"--resample-rounds must be >= 0, got {args.resample_rounds}")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; collect writes a rankings file (JSONL)")


def write_args_beside(out: Path, args: CollectArgs) -> None:
    """OUT.args.json (OUT is a file): the resolved arguments, a recipe that reproduces the file; atomic."""
    text = json.dumps(to_dict(args), indent=2, ensure_ascii=False) + "\n"
    atomic_write(out.with_name(out.name + ".args.json"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@dataclass
class Collection:
    tok: Tokenizer
    model: torch.nn.Module  # the policy, in eval mode
    items: list[Prompt]
    records: list[dict]  # the world's record of each prompt: what the labeler ranks by
    labeler: Labeler
    k: list[int]  # responses to collect for each prompt
    params: SamplingParams
    generator: torch.Generator


def set_up(args: CollectArgs) -> Collection:
    """The policy, the prompts with their world records, the labeler, each prompt's K and the sampler."""
    tok = Tokenizer.load(args.init / "tokenizer.json")
    dev = resolve_device(args.device)
    model = load_model(args.init, device=dev).eval()
    items = list(read_prompts(args.prompts))[:args.max_prompts]
    records = [world_record(p) for p in items]
    labeler = Labeler.load(args.world, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    k = rng.integers(args.k_min, args.k_max + 1, size=len(items)).tolist()
    generator = torch.Generator(device=dev).manual_seed(args.seed)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    return Collection(tok, model, items, records, labeler, k, params, generator)


def sample_all(args: CollectArgs, c: Collection) -> tuple[list[list[tuple[str, bool]]], int, int]:
    """(non-empty (text, ended) replies of each prompt, replies sampled, empty replies dropped)."""
    kept: list[list[tuple[str, bool]]] = [[] for _ in c.items]
    need, empty, sampled = list(c.k), 0, 0
    progress = Progress(sum(c.k), "collect")
    for _ in range(1 + args.resample_rounds):
        if not any(need):
            break
        got = sample_responses(c.model, c.tok, c.items, need, c.params, args.batch_size, c.generator, progress,
                               start=sampled)
        sampled += sum(need)
        for i, replies in enumerate(got):
            good = [(r, e) for r, e in replies if r.strip()]
            empty += len(replies) - len(good)
            kept[i] += good
        need = [c.k[i] - len(kept[i]) for i in range(len(c.items))]
    progress.close()
    return kept, sampled, empty


def rank_all(args: CollectArgs, c: Collection, kept: list[list[tuple[str, bool]]]) -> tuple[list[dict], int]:
    """(one rankings row per prompt with at least k_min replies, prompts dropped for having fewer)."""
    rows, short = [], 0
    for p, rec, resp in zip(c.items, c.records, kept):
        if len(resp) < args.k_min:
            short += 1
            continue
        texts, ended = [r for r, _ in resp], [e for _, e in resp]
        ranking = c.labeler.rank(rec, texts, ended)
        rows.append({"prompt": p.messages, "completions": texts, "ranking": ranking, "ended": ended,
                     "family": rec["family"], "id": rec["id"]})
    if not rows:
        raise UserError(f"--init {args.init}: no prompt got {args.k_min} non-empty responses; the policy is not "
                        "ready to collect from")
    return rows, short
