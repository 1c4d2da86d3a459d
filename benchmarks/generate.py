"""Benchmark greedy decoding: our engine (instructgpt.generate, KV cache) against Hugging Face generate()
on the same weights (exported through instructgpt.hf), in one run.

    python benchmarks/generate.py [--batch-sizes 1 16] [--threads 2] [--repeats 5] [--profile]

A 4-layer, 4-head, 128-wide GPT-2-style model (vocab 512, random init, fp32), 48-token prompts, 64 new
tokens. Neither engine stops early: our end token is an id that cannot occur (-1) and the exported model
has no eos. Both must produce the same tokens before anything is timed. Prints one JSON line per
(engine, batch) with new tokens per second (prefill included, best of --repeats), then one with the
ratios. --profile adds the top operators of our batch-16 generation under torch.profiler.

On a loaded 2-core machine, OpenMP threads that spin at every barrier make these microsecond-sized ops
100x slower for both engines; `OMP_WAIT_POLICY=passive` keeps the figures meaningful (see README.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from instructgpt.batching import pad
from instructgpt.checkpoint import save_model
from instructgpt.generate import SamplingParams, generate
from instructgpt.hf_export import export_hf
from instructgpt.model import GPT, ModelConfig

PROMPT_LEN, NEW_TOKENS, PAD = 48, 64, 0


def build_models(tmp: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = ModelConfig.gpt2(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128)
    ours = GPT(cfg).eval()
    save_model(ours, tmp / "ours")
    export_hf(tmp / "ours", tmp / "hf", log=lambda _: None)  # no tokenizer: weights and config only
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    return ours, hf


def prompts_for(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, 512, (batch, PROMPT_LEN), generator=g).tolist()


def run_ours(model, prompts) -> torch.Tensor:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
    return generate(model, prompts, params, eos_id=-1, pad_id=PAD).tokens


def run_hf(model, prompts) -> torch.Tensor:
    idx, mask = pad(prompts, PAD, "left")
    with torch.no_grad():
        out = model.generate(input_ids=idx, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=PAD,
                             eos_token_id=None)
    return out[:, idx.size(1):]


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function; the engines take turns so that load from other processes on the
    machine falls on both alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def profile_ours(model, prompts) -> None:
    from torch.profiler import ProfilerActivity, profile

    run_ours(model, prompts)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_ours(model, prompts)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_models(Path(tmp))
    rates: dict[tuple[str, int], float] = {}
    for batch in args.batch_sizes:
        prompts = prompts_for(batch)
        mine, theirs = run_ours(ours, prompts), run_hf(hf, prompts)
        if not torch.equal(mine, theirs):
            raise SystemExit(f"batch {batch}: the engines disagree; not timing them")
        engines = {"instructgpt": lambda p=prompts: run_ours(ours, p), "hf": lambda p=prompts: run_hf(hf, p)}
        seconds = best_times(engines, args.repeats)
        for engine, t in seconds.items():
            rates[engine, batch] = batch * NEW_TOKENS / t
            print(json.dumps({"engine": engine, "batch": batch, "prompt_tokens": PROMPT_LEN,
                              "new_tokens": NEW_TOKENS, "seconds": round(t, 4),
                              "new_tokens_per_s": round(rates[engine, batch], 1), "threads": args.threads}))
    print(json.dumps({f"ratio_batch_{b}": round(rates["instructgpt", b] / rates["hf", b], 2)
                      for b in args.batch_sizes}))
    if args.profile:
        profile_ours(ours, prompts_for(max(args.batch_sizes)))


if __name__ == "__main__":
    main()
