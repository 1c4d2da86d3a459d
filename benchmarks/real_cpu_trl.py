"""TRL's side of benchmarks/real_cpu.py: one workload (rm or dpo) with LoRA through PEFT, in TRL's own virtual
environment (trl 1.16, transformers, peft, torch on the CPU), which the project does not depend on.

real_cpu.py starts it as a child process with the same flags as its own side, after writing into --work the
exported models (hf_rm: LlamaForSequenceClassification with the drawn score head; hf_lm: LlamaForCausalLM) and
the pairs in TRL's conversational format, already shuffled, and reads the figures it writes to --result:

    seconds, cpu_seconds     wall (and CPU) time of the timed steps: from the end of warm-up step --warmup to the
                             end of step --warmup + --steps (a TrainerCallback, as ../shared/peers/trl/bench_trl.py)
    heldout_accuracy         RewardTrainer: eval "accuracy" (chosen reward above rejected); DPOTrainer: eval
                             "rewards/accuracies" (a positive implicit reward margin); a mean over eval batches,
                             exact because real_cpu.py holds out whole batches
    sequence_digest          a digest of the token ids TRL trained on, checked against our renderer's
    own_peak_rss_mib         this process's VmHWM, a check on the ru_maxrss real_cpu.py reads with os.wait4
    tokens_per_pair, threads, param_dtype, activation_checkpointing, trainable_params, versions

Settings as ours: LoRA r, alpha, dropout 0 on q, k, v, o, gate, up and down_proj (task SEQ_CLS with the score
head in modules_to_save for the reward model, CAUSAL_LM for DPO, whose reference is the policy with its
adapters disabled, every step); fp32; no gradient checkpointing (TRL's default is on); AdamW fused, betas
(0.9, 0.999), no weight decay, a constant learning rate, gradient norm clipped to 1; pairs read in file order.
"""

import os

# Offline and quiet, before any Hugging Face import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # ours: attn + mlp


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_timer(warmup: int, steps: int):
    """A callback that notes the time at the end of step `warmup` and of step `warmup + steps`, and what the
    model runs with once warm-up is over."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.checks = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                model = kwargs.get("model")
                self.checks = {"threads": torch.get_num_threads(),
                               "param_dtype": str(next(model.parameters()).dtype),
                               "activation_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}
                self.t0, self.c0 = time.perf_counter(), time.process_time()
            elif state.global_step == warmup + steps:
                self.t1, self.c1 = time.perf_counter(), time.process_time()
            return control

    return StepTimer()


def common_args(a: argparse.Namespace, out_dir: Path) -> dict:
    """The settings both trainers share: fp32 on the CPU, no I/O, transformers' AdamW as ours is set."""
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=a.batch, per_device_eval_batch_size=a.batch,
        gradient_accumulation_steps=1, max_steps=a.warmup + a.steps, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused", bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        seed=a.seed, train_sampling_strategy="sequential", prediction_loss_only=True, max_length=a.max_length,
        disable_dropout=True,
    )


def lora_config(a: argparse.Namespace, task: str):
    from peft import LoraConfig

    return LoraConfig(task_type=task, r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS,
                      bias="none", modules_to_save=["score"] if task == "SEQ_CLS" else None)


def digest(sequences) -> str:
    """The same digest real_cpu.py takes of our renderer's ids: each sequence's ids as a JSON list, in order."""
    h = hashlib.sha256()
    for ids in sequences:
        h.update(json.dumps([int(t) for t in ids]).encode())
    return h.hexdigest()[:16]


def train_and_evaluate(trainer, timer, a: argparse.Namespace) -> dict:
    trainer.train()
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError(f"the step timer did not fire ({trainer.state.global_step} steps done)")
    metrics = trainer.evaluate()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"seconds": timer.t1 - timer.t0, "cpu_seconds": timer.c1 - timer.c0, **timer.checks, "eval": metrics,
            "trainable_params": trainable}


def wl_rm(a: argparse.Namespace, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(a.seed)  # before PEFT draws the adapters
    tok = AutoTokenizer.from_pretrained(work / "hf_rm")
    model = AutoModelForSequenceClassification.from_pretrained(work / "hf_rm", num_labels=1, dtype=torch.float32)
    timer = make_timer(a.warmup, a.steps)
    trainer = RewardTrainer(
        model=model, args=RewardConfig(**common_args(a, work / "trl_rm")),
        train_dataset=Dataset.from_list(read_pairs(work / "pairs_train.jsonl")),
        eval_dataset=Dataset.from_list(read_pairs(work / "pairs_heldout.jsonl")),
        processing_class=tok, peft_config=lora_config(a, "SEQ_CLS"), callbacks=[timer])
    data = trainer.train_dataset
    seqs = [ids for row in data for ids in (row["chosen_ids"], row["rejected_ids"])]
    out = train_and_evaluate(trainer, timer, a)
    metrics = out.pop("eval")
    return {**out, "heldout_accuracy": metrics["eval_accuracy"], "heldout_pairs": len(trainer.eval_dataset),
            "train_pairs": len(data), "tokens_per_pair": sum(map(len, seqs)) / len(data),
            "sequence_digest": digest(seqs)}


def wl_dpo(a: argparse.Namespace, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(work / "hf_lm")
    model = AutoModelForCausalLM.from_pretrained(work / "hf_lm", dtype=torch.float32)
    timer = make_timer(a.warmup, a.steps)
    trainer = DPOTrainer(
        model=model, args=DPOConfig(**common_args(a, work / "trl_dpo"), beta=a.beta),
        train_dataset=Dataset.from_list(read_pairs(work / "pairs_train.jsonl")),
        eval_dataset=Dataset.from_list(read_pairs(work / "pairs_heldout.jsonl")),
        processing_class=tok, peft_config=lora_config(a, "CAUSAL_LM"), callbacks=[timer])
    data = trainer.train_dataset
    seqs = [row["prompt_ids"] + row[k] for row in data for k in ("chosen_ids", "rejected_ids")]
    out = train_and_evaluate(trainer, timer, a)
    metrics = out.pop("eval")
    return {**out, "heldout_accuracy": metrics["eval_rewards/accuracies"],
            "heldout_margin": metrics["eval_rewards/margins"], "heldout_pairs": len(trainer.eval_dataset),
            "train_pairs": len(data), "ref_model_loaded": trainer.ref_model is not None,
            "tokens_per_pair": sum(map(len, seqs)) / len(data), "sequence_digest": digest(seqs)}


def own_peak_mib() -> float | None:
    """This process's peak RSS (VmHWM, which exec resets), a check on the figure os.wait4 gives real_cpu.py."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=["rm", "dpo"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True, help="where the figures go (JSON)")
    for flag, kind in (("--steps", int), ("--warmup", int), ("--batch", int), ("--rank", int), ("--alpha", float),
                       ("--lr", float), ("--beta", float), ("--max-length", int), ("--threads", int),
                       ("--seed", int)):
        ap.add_argument(flag, type=kind, required=True)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")

    import peft
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    with contextlib.redirect_stdout(sys.stderr):  # the libraries' prints stay off stdout
        figures = {"rm": wl_rm, "dpo": wl_dpo}[a.workload](a, a.work)
    figures |= {"load_avg_start": load, "trl": trl.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "torch": torch.__version__, "own_peak_rss_mib": own_peak_mib()}
    a.result.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
