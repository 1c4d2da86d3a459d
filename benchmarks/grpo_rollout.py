"""Benchmark group-RL rollouts: each prompt prefilled once for its G samples (the continuous-batching engine,
`rl.rollout(..., group_size=G, shared_prefill=True)`, the default) against the static batch that prefills it
G times (`shared_prefill=False`, what torchrun's ranks use), in one run.

    python benchmarks/grpo_rollout.py [--shapes tiny small] [--prompts 8] [--group-size 8] [--repeats 5]
                                      [--threads 2] [--init SFT_DIR --prompt-file PROMPTS.jsonl]

Shapes:
- tiny: the pipeline's tiny preset (4 layers, 4 heads, 128 wide, context 128, vocab 2048) with its GRPO
  settings (8 prompts x G = 8 samples, 24 new tokens, temperature 1); prompts of 20-40 tokens.
- small: the small preset's shape, closer to a real model, where prefill weighs more (8 layers, 8 heads,
  512 wide, context 256, vocab 4096); prompts of 180-220 tokens, 32 new tokens (its GRPO setting).

Weights are random (GPT-2's init: nearly uniform next-token distributions) and V/32 of the ids stop a row, so
each step ends about 3% of the running rows: rows end at varied lengths, as a policy's do, about half of them
before the limit. `--init` replaces the tiny shape by a trained checkpoint (an SFT folder with its
tokenizer.json): its own stop ids, and the prompts of `--prompt-file` rendered with the chat template.

The two ways take turns, each repeat from the same generator seed, so that load from other processes falls
on both alike. Prints one JSON line per (shape, way): median and best seconds over --repeats, the prompt
tokens that went through the model, the mean response length and the share of rows that ended; then one
line per shape with shared / static (of the medians) and the time saved.

On a loaded 2-core machine OpenMP threads that spin at every barrier slow small ops down 100x for both ways;
run with `OMP_WAIT_POLICY=passive` (see README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from instructgpt.generate import SamplingParams
from instructgpt.model import GPT, ModelConfig
from instructgpt.rl import rollout

PAD = 0
SHAPES = {
    "tiny": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048), prompt_len=(20, 40),
                 new_tokens=24),
    "small": dict(model=dict(n_layer=8, n_head=8, n_embd=512, block_size=256, vocab_size=4096),
                  prompt_len=(180, 220), new_tokens=32),
}


def random_setup(shape: dict, n_prompts: int, seed: int = 0) -> tuple[GPT, list[list[int]], list[int]]:
    """A randomly initialised GPT of the shape, n_prompts random prompts, and V/32 stop ids."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**shape["model"])
    model = GPT(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    lo, hi = shape["prompt_len"]
    lengths = torch.randint(lo, hi + 1, (n_prompts,), generator=g).tolist()
    stops = list(range(1, 1 + cfg.vocab_size // 32))
    prompts = [torch.randint(1 + len(stops), cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return model, prompts, stops


def trained_setup(init: Path, prompt_file: Path, n_prompts: int) -> tuple[GPT, list[list[int]], list[int]]:
    """A trained checkpoint, the first n_prompts of prompt_file rendered with its chat template, its stop ids."""
    from instructgpt.chat import render_prompt
    from instructgpt.checkpoint import load_model
    from instructgpt.data import read_prompts
    from instructgpt.tokenizer import Tokenizer

    tok = Tokenizer.load(init / "tokenizer.json")
    model = load_model(init, kind="gpt").eval()
    prompts = [render_prompt(tok, p.messages) for p in list(read_prompts(prompt_file))[:n_prompts]]
    return model, prompts, list(tok.stop_ids)


def time_ways(model: GPT, prompts: list[list[int]], stops: list[int], G: int, new_tokens: int,
              repeats: int) -> dict[str, dict]:
    """Seconds of each rollout (median, best) and what it produced, the ways taking turns."""
    rows = [p for p in prompts for _ in range(G)]  # each prompt G times side by side, as the ppo stage does
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    ways = {"shared_prefill": True, "static": False}
    times: dict[str, list[float]] = {way: [] for way in ways}
    stats: dict[str, dict] = {}
    for r in range(repeats + 1):  # the first round warms up
        for way, shared in ways.items():
            gen = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            ro = rollout(model, rows, params, stops, PAD, gen, group_size=G, shared_prefill=shared)
            if r:
                times[way].append(time.perf_counter() - t0)
            lengths = ro.response_mask.sum(1).float()
            stats.setdefault(way, {"mean_response_len": [], "ended": []})
            stats[way]["mean_response_len"].append(float(lengths.mean()))
            stats[way]["ended"].append(float(ro.ended.float().mean()))
    prefilled = {"shared_prefill": sum(map(len, prompts)), "static": sum(map(len, rows))}
    return {way: {"median_s": round(statistics.median(ts), 4), "best_s": round(min(ts), 4),
                  "prompt_tokens_prefilled": prefilled[way],
                  "mean_response_len": round(statistics.mean(stats[way]["mean_response_len"]), 2),
                  "ended": round(statistics.mean(stats[way]["ended"]), 3)}
            for way, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts per rollout batch")
    ap.add_argument("--group-size", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, help="a trained checkpoint folder to time instead of the tiny shape")
    ap.add_argument("--prompt-file", type=Path, help="prompts for --init (any format the readers accept)")
    args = ap.parse_args()
    if (args.init is None) != (args.prompt_file is None):
        ap.error("--init and --prompt-file go together")
    torch.set_num_threads(args.threads)
    for name in args.shapes:
        shape = SHAPES[name]
        if name == "tiny" and args.init is not None:
            model, prompts, stops = trained_setup(args.init, args.prompt_file, args.prompts)
            name = f"tiny:{args.init}"
        else:
            model, prompts, stops = random_setup(shape, args.prompts)
        new = shape["new_tokens"]
        res = time_ways(model, prompts, stops, args.group_size, new, args.repeats)
        common = {"shape": name, "prompts": len(prompts), "group_size": args.group_size, "new_tokens": new,
                  "mean_prompt_len": round(sum(map(len, prompts)) / len(prompts), 1), "threads": args.threads,
                  "repeats": args.repeats}
        for way, r in res.items():
            print(json.dumps({**common, "way": way, **r}), flush=True)
        ratio = res["shared_prefill"]["median_s"] / res["static"]["median_s"]
        print(json.dumps({"shape": name, "shared_vs_static_median": round(ratio, 3),
                          "time_saved": f"{100 * (1 - ratio):.0f}%"}), flush=True)


if __name__ == "__main__":
    main()
