"""Comparison collection: sample K responses per prompt from a policy and have the labeler rank them.

In the paper, labelers ranked K = 4..9 outputs of the models for each prompt; here the world's scripted
labeler plays them. The output is a rankings file ({"prompt", "completions", "ranking"}), the same format
a user brings, so `instructgpt rm` cannot tell who ranked.

Sampling is the long part, so it is saved as it goes: each batch's replies, with the sampler's generator state
after it, become a chunk file in OUT.chunks/. A stopped collection, run again with the same arguments, model
and prompts, replays the chunks and samples on from the last one: its rankings file is the one an uninterrupted
run writes, byte for byte. The rankings file itself is still written whole, atomically, at the end.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .chat import render_prompt, reply_text
from .checkpoint import atomic_write, load_model, write_json_atomic
from .data import Prompt, read_prompts, write_jsonl
from .distributed import resolve_device
from .errors import UserError
from .generate import SamplingParams, generate
from .recipe import to_dict
from .records import file_digest, read_json_file
from .tokenizer import Tokenizer
from .train import Progress
from .world.judge import world_record
from .world.labeler import Labeler
from .world.world import FAMILIES

Reply = tuple[int, str, bool]  # (prompt index, text, ended with the end token)


def sample_batches(model, tok: Tokenizer, rows: list[tuple[int, list[int]]], params: SamplingParams,
                   batch_size: int, generator: torch.Generator, first: int = 0) -> Iterator[list[Reply]]:
    """The replies to `rows` ((prompt index, prompt ids), one row per reply), a batch of `batch_size` rows at a
    time, from batch number `first` on."""
    for s in range(first * batch_size, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        gen = generate(model, [ids for _, ids in chunk], params, tok.stop_ids, tok.pad_id, generator,
                       start_id=tok.bos_id)
        yield [(i, reply_text(tok, ids), ended)
               for (i, _), ids, ended in zip(chunk, gen.token_lists(), gen.ended.tolist())]


def reply_rows(tok: Tokenizer, prompts: list[Prompt], k: list[int]) -> list[tuple[int, list[int]]]:
    """One (prompt index, rendered prompt) row per reply to sample: k[i] copies of prompt i, in prompt order."""
    return [(i, render_prompt(tok, p.messages)) for i, p in enumerate(prompts) for _ in range(k[i])]


def sample_responses(model, tok: Tokenizer, prompts: list[Prompt], k: list[int], params: SamplingParams,
                     batch_size: int, generator: torch.Generator) -> list[list[tuple[str, bool]]]:
    """k[i] sampled (text, ended) responses for each prompt (temperature 1 by default), generated in
    batches of `batch_size` rows (one row per response; a prompt's copies share batches)."""
    out: list[list[tuple[str, bool]]] = [[] for _ in prompts]
    for batch in sample_batches(model, tok, reply_rows(tok, prompts, k), params, batch_size, generator):
        for i, text, ended in batch:
            out[i].append((text, ended))
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

    # 2. sample k[i] replies per prompt; replace empty ones in further rounds; saved chunk by chunk
    chunks = Chunks.open(chunk_folder(args.out), chunk_key(args, c))
    kept, sampled, empty = sample_all(args, c, chunks)

    # 3. the labeler ranks each prompt's replies; the rankings file is written whole, then the chunks go
    rows, short = rank_all(args, c, kept)
    write_jsonl(args.out, rows)
    shutil.rmtree(chunks.folder)
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
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")


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
    device: torch.device


def set_up(args: CollectArgs) -> Collection:
    """The policy, the prompts with their world records, the labeler, each prompt's K and the sampler."""
    tok = Tokenizer.load(args.init / "tokenizer.json")
    dev = resolve_device(args.device)
    model = load_model(args.init, device=dev).eval()
    items = list(read_prompts(args.prompts))[:args.max_prompts]
    records = [world_record(p) for p in items]
    unknown = next(((n, r["family"]) for n, r in enumerate(records, 1) if r["family"] not in FAMILIES), None)
    if unknown:  # the labeler would fail on it after all the sampling
        raise UserError(f"--prompts {args.prompts}: prompt {unknown[0]} has the task family {unknown[1]!r}, which "
                        f"the labeler does not know ({', '.join(FAMILIES)})")
    labeler = Labeler.load(args.world, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    k = rng.integers(args.k_min, args.k_max + 1, size=len(items)).tolist()
    generator = torch.Generator(device=dev).manual_seed(args.seed)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    try:
        params.validate()
    except ValueError as e:  # a flag's value, said in the flag's name
        raise UserError(f"--{str(e).replace('_', '-')}") from None
    # a prompt that does not fit is the user's to fix, before anything is sampled (an encoder-decoder reads the
    # prompt in its encoder and writes the reply after a start token in its decoder)
    block, seq2seq = model.config.block_size, model.config.arch == "seq2seq"
    room = block if seq2seq else block - args.max_new_tokens
    if args.max_new_tokens + seq2seq > block or room < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {block} tokens")
    for n, p in enumerate(items, start=1):
        if (length := len(render_prompt(tok, p.messages))) > room:
            raise UserError(f"--prompts {args.prompts}: prompt {n} is {length} tokens, and with --max-new-tokens "
                            f"{args.max_new_tokens} does not fit the model's context of {block} tokens")
    return Collection(tok, model, items, records, labeler, k, params, generator, dev)


def sample_all(args: CollectArgs, c: Collection, chunks: Chunks) -> tuple[list[list[tuple[str, bool]]], int, int]:
    """(non-empty (text, ended) replies of each prompt, replies sampled, empty replies dropped). The batches
    that `chunks` holds are replayed from it, the others sampled and saved to it."""
    kept: list[list[tuple[str, bool]]] = [[] for _ in c.items]
    need, empty, sampled = list(c.k), 0, 0
    progress = Progress(sum(c.k), "collect")
    for round_ in range(1 + args.resample_rounds):
        if not any(need):
            break
        rows = reply_rows(c.tok, c.items, need)
        got: list[list[tuple[str, bool]]] = [[] for _ in c.items]
        batches = chunks.batches(round_)
        if len(batches) * args.batch_size < len(rows):
            chunks.restore(c.generator)  # where the last saved batch left it
            batches = chunks.saving(round_, batches, c.generator, sample_batches(
                c.model, c.tok, rows, c.params, args.batch_size, c.generator, first=len(batches)))
        for b, batch in enumerate(batches):
            for i, text, ended in batch:
                got[i].append((text, ended))
            progress.update(sampled + min((b + 1) * args.batch_size, len(rows)))
        sampled += len(rows)
        for i, replies in enumerate(got):
            good = [(r, e) for r, e in replies if r.strip()]
            empty += len(replies) - len(good)
            kept[i] += good
        need = [c.k[i] - len(kept[i]) for i in range(len(c.items))]
    progress.close()
    return kept, sampled, empty


def chunk_folder(out: Path) -> Path:
    return out.with_name(out.name + ".chunks")


def chunk_key(args: CollectArgs, c: Collection) -> dict:
    """Everything the sampled replies depend on: saved chunks are replayed only for the same."""
    return {"args": to_dict(args), "device": c.device.type, "prompts": file_digest(args.prompts),
            **{f: file_digest(args.init / f) for f in ("model.safetensors", "config.json", "tokenizer.json")}}


class Chunks:
    """The batches of replies sampled so far, one file each (chunk-ROUND-BATCH.json: the replies, and the
    sampler's generator state after them) in a folder beside the rankings file, and key.json, what they were
    sampled from. Every file is written atomically, so the chunks on disk are always the first batches of the
    collection, whole."""

    def __init__(self, folder: Path, saved: dict[int, list[list[Reply]]], state: str | None):
        self.folder, self.saved, self.state = folder, saved, state

    @classmethod
    def open(cls, folder: Path, key: dict) -> Chunks:
        """The chunks an earlier run with this key left in `folder` (chunks of another key are removed)."""
        if folder.is_dir() and not _same_key(folder / "key.json", key):
            print(f"[collect] {folder}: chunks of another collection (other arguments, model or prompts) removed")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "key.json", key)
        saved: dict[int, list[list[Reply]]] = {}
        state = None
        numbered = sorted((tuple(map(int, path.stem.split("-")[1:])), path) for path in folder.glob("chunk-*.json"))
        for (round_, batch), path in numbered:
            if batch != len(saved.setdefault(round_, [])):
                raise UserError(f"{path}: a chunk out of order (batch {batch} after {len(saved[round_])} of round "
                                f"{round_}); delete {folder} to sample again")
            chunk = read_json_file(path)
            saved[round_].append([(int(i), text, bool(ended)) for i, text, ended in chunk["replies"]])
            state = chunk["generator"]
        if saved:
            print(f"[collect] resuming: {sum(map(len, saved.values()))} batches of replies saved in {folder}")
        return cls(folder, saved, state)

    def batches(self, round_: int) -> list[list[Reply]]:
        return self.saved.get(round_, [])

    def restore(self, generator: torch.Generator) -> None:
        """Put the generator where the last saved batch left it (once: the saved batches come first)."""
        if self.state is not None:
            generator.set_state(torch.frombuffer(bytearray(base64.b64decode(self.state)), dtype=torch.uint8))
            self.state = None

    def saving(self, round_: int, saved: list[list[Reply]], generator: torch.Generator,
               new: Iterator[list[Reply]]) -> Iterator[list[Reply]]:
        """The saved batches of a round, then each new one, written to its chunk as it comes."""
        yield from saved
        for b, batch in enumerate(new, start=len(saved)):
            state = base64.b64encode(generator.get_state().numpy().tobytes()).decode()
            write_json_atomic(self.folder / f"chunk-{round_:02d}-{b:06d}.json",
                              {"replies": [list(r) for r in batch], "generator": state})
            yield batch


def _same_key(path: Path, key: dict) -> bool:
    try:
        return read_json_file(path) == key
    except UserError:
        return False


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
