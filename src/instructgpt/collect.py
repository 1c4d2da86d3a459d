"""Comparison collection: sample K responses per prompt from a policy and have the labeler rank them.

In the paper, labelers ranked K = 4..9 outputs of the models for each prompt; here the world's scripted
labeler plays them. The output is a rankings file ({"prompt", "completions", "ranking"}), the same format
a user brings, so `instructgpt rm` cannot tell who ranked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .chat import render_prompt
from .checkpoint import load_model
from .data import Prompt, read_prompts, write_jsonl
from .distributed import resolve_device
from .errors import UserError
from .generate import SamplingParams, generate
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


def collect_command(
    policy: Path,
    prompts: Path,
    out: Path,
    world: Path,
    k_min: int = 4,
    k_max: int = 9,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 48,
    max_prompts: int | None = None,
    resample_rounds: int = 3,
    batch_size: int = 64,
    seed: int = 1337,
    device: str = "auto",
) -> dict:
    """Sample K (between k_min and k_max) responses per prompt and write the labeler's rankings.

    Empty (or whitespace-only) replies cannot be ranked: they are dropped, counted, and sampled again
    (up to resample_rounds more times); a prompt still short of k_min replies is dropped and counted.

    Args:
        policy: the model to sample from (the paper sampled from its SFT and later models).
        prompts: prompt file (world prompts carry the ground truth the labeler needs).
        out: rankings file (JSONL) to write, atomically.
        world: the world folder whose labeler ranks the responses.
        k_min: fewest responses per prompt (the paper: 4).
        k_max: most responses per prompt (the paper: 9); each prompt's K is drawn uniformly in between.
        temperature: sampling temperature (1: the policy's own distribution).
        top_p: nucleus sampling threshold (1: off).
        max_new_tokens: a reply cut at this length is kept, flagged "ended": false.
        max_prompts: use only the first this many prompts.
        resample_rounds: extra sampling rounds for prompts that lost replies to emptiness.
        batch_size: rows (prompt copies) generated together.
        seed: seeds K, the sampling and the labeler's noise.
        device: auto, cpu, cuda or cuda:N.
    """
    t0 = time.time()
    if not 2 <= k_min <= k_max:
        raise UserError(f"need 2 <= --k-min <= --k-max, got {k_min} and {k_max}")
    if resample_rounds < 0:
        raise UserError(f"--resample-rounds must be >= 0, got {resample_rounds}")
    policy, out = Path(policy), Path(out)
    tok = Tokenizer.load(policy / "tokenizer.json")
    dev = resolve_device(device)
    model = load_model(policy, device=dev).eval()
    items = list(read_prompts(prompts))[:max_prompts]
    records = [world_record(p) for p in items]
    labeler = Labeler.load(world, seed=seed)
    rng = np.random.default_rng(seed)
    k = rng.integers(k_min, k_max + 1, size=len(items)).tolist()
    generator = torch.Generator(device=dev).manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)

    # 1. sample k[i] replies per prompt; replace empty ones in further rounds
    kept: list[list[tuple[str, bool]]] = [[] for _ in items]
    need, empty, sampled = list(k), 0, 0
    progress = Progress(sum(k), "collect")
    for _ in range(1 + resample_rounds):
        if not any(need):
            break
        got = sample_responses(model, tok, items, need, params, batch_size, generator, progress, start=sampled)
        sampled += sum(need)
        for i, replies in enumerate(got):
            good = [(r, e) for r, e in replies if r.strip()]
            empty += len(replies) - len(good)
            kept[i] += good
        need = [k[i] - len(kept[i]) for i in range(len(items))]
    progress.close()

    # 2. the labeler ranks each prompt's replies
    rows, short = [], 0
    for p, rec, resp in zip(items, records, kept):
        if len(resp) < k_min:
            short += 1
            continue
        texts, ended = [r for r, _ in resp], [e for _, e in resp]
        ranking = labeler.rank(rec, texts, ended)
        rows.append({"prompt": p.messages, "completions": texts, "ranking": ranking, "ended": ended,
                     "family": rec["family"], "id": rec["id"]})
    if not rows:
        raise UserError(f"{policy}: no prompt got {k_min} non-empty responses; the policy is not ready to "
                        "collect from")
    write_jsonl(out, rows)
    sizes = [len(r["completions"]) for r in rows]
    summary = {"stage": "collect", "prompts": len(rows), "completions": sum(sizes),
               "comparisons": sum(n * (n - 1) // 2 for n in sizes), "sampled": sampled,
               "empty_replies_dropped": empty, "prompts_dropped": short,
               "unended": sum(not e for r in rows for e in r["ended"]), "seconds": round(time.time() - t0, 2)}
    print(json.dumps(summary))
    return summary
