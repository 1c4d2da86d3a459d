"""The report card of a run: `report.md` and a self-contained `report.html` (plots embedded), with
`plots/*.png` beside them.

It reads only files: `pipeline.json` (preset, seed, seconds per stage), each stage's `metrics.jsonl`, and
`eval/results.json`.

The report is made to be shared, and it quotes model replies and prompts, which are anyone's text: they are
written inside fenced code blocks, so no line of theirs can start Markdown (an image, a heading, a table), and
the HTML embeds only the plot files this module drew, never a file a line names.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write
from .errors import UserError
from .evaluate import MODEL_ORDER
from .records import read_json_file
from .train import read_metrics

LABELS = {"pretrained": "pretrained (few-shot)", "sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx", "dpo": "DPO",
          "grpo": "GRPO"}
COLOURS = {"pretrained": "#999999", "sft": "#4c72b0", "ppo": "#dd8452", "ppo_ptx": "#c44e52", "dpo": "#55a868",
           "grpo": "#8172b3"}


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def make_plots(run: Path, results: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    out: dict[str, Path] = {}

    # Loss curves of the supervised stages.
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (stage, keys, title) in zip(axes, [
        ("pretrain", ("loss", "val_loss"), "pretraining loss"),
        ("sft", ("loss", "val_loss"), "SFT loss"),
        ("rm", ("loss", "val_accuracy"), "reward model: loss and held-out accuracy"),
        ("dpo", ("loss", "eval/accuracy"), "DPO: loss and held-out accuracy"),
    ]):
        rows = read_metrics(run / stage / "metrics.jsonl")
        for k in keys:
            x, y = _series(rows, k)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 12 else None, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out["losses"] = plots / "losses.png"
    fig.savefig(out["losses"], dpi=110)
    plt.close(fig)

    # Reward and KL during PPO.
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for stage in ("ppo", "ppo_ptx"):
        rows = read_metrics(run / stage / "metrics.jsonl")
        for ax, key in zip(axes, ("objective/scores", "objective/kl")):
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, label=LABELS[stage])
    for ax, title in zip(axes, ("reward-model score of rollouts", "KL(policy || SFT) per response")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out["ppo"] = plots / "ppo.png"
    fig.savefig(out["ppo"], dpi=110)
    plt.close(fig)

    # The paper's Figure 1 for this world: win rate against SFT.
    models = [m for m in MODEL_ORDER if m in results["models"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rates = [results["models"][m]["win_rate_vs_sft"] for m in models]
    lo = [r - results["models"][m]["win_rate_ci95"][0] for m, r in zip(models, rates)]
    hi = [results["models"][m]["win_rate_ci95"][1] - r for m, r in zip(models, rates)]
    ax.bar([LABELS[m] for m in models], rates, yerr=[lo, hi], capsize=4, color=[COLOURS[m] for m in models])
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate against SFT")
    ax.set_title("Labeler preference against the SFT model (95% CI)", fontsize=10)
    fig.tight_layout()
    out["win_rate"] = plots / "win_rate.png"
    fig.savefig(out["win_rate"], dpi=110)
    plt.close(fig)

    # Labeler score per task family.
    families = sorted({f for m in models for f in results["models"][m]["per_family"]})
    fig, ax = plt.subplots(figsize=(12, 3.6))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        pf = results["models"][m]["per_family"]
        ax.bar([j + i * width for j in range(len(families))],
               [pf.get(f, {}).get("labeler_score") or 0 for f in families], width, label=LABELS[m])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))])
    ax.set_xticklabels(families, rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("labeler score")
    ax.legend(fontsize=8, ncol=len(models))
    fig.tight_layout()
    out["families"] = plots / "families.png"
    fig.savefig(out["families"], dpi=110)
    plt.close(fig)

    grpo = grpo_plot(plt, run, plots / "grpo.png")
    if grpo is not None:
        out["grpo"] = grpo
    return out


# The GRPO stage's curves: (metric, title), under TRL's names (`rl.rollout_metrics`).
GRPO_CURVES = (("reward", "reward (world checker) of rollouts"), ("kl", "KL(policy || SFT) per token (k3)"),
               ("completion_length", "response length (tokens)"))


def grpo_plot(plt, run: Path, path: Path) -> Path | None:
    """Reward, KL and response length over the steps of RUN/grpo/metrics.jsonl; None when it has no rows."""
    rows = read_metrics(run / "grpo" / "metrics.jsonl")
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(GRPO_CURVES), figsize=(15, 3.2))
    for ax, (key, title) in zip(axes, GRPO_CURVES):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="o" if len(x) < 12 else None, color=COLOURS["grpo"], alpha=0.5 if len(x) >= 20 else 1)
        if len(x) >= 20:  # a batch holds few prompts: the mean over 10 steps shows the trend
            ax.plot(x[9:], np.convolve(y, np.ones(10) / 10, mode="valid"), color=COLOURS["grpo"], label="mean of 10")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(run: Path, manifest: dict, results: dict, plots: dict[str, Path]) -> str:
    models = [m for m in MODEL_ORDER if m in results["models"]]
    lines = [f"# instructgpt run report: `{run.name}`", ""]
    lines += [f"Preset `{manifest.get('preset')}`, seed {manifest.get('seed')}, "
              f"{results.get('prompts')} held-out prompts.", ""]
    lines += ["## Time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in manifest.get("stage_seconds", {}).items()]
    lines += ["", "## Win rate against SFT (labeler preference)", "",
              f"![win rate]({plots['win_rate'].relative_to(run)})", ""]
    lines += ["| model | win rate vs SFT | 95% CI | labeler score | hallucination | refusal (harmful) | "
              "over-refusal (benign) | constraints | held-out pretraining loss |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in models:
        r = results["models"][m]
        lo, hi = r["win_rate_ci95"]
        cells = [LABELS[m], _fmt(r["win_rate_vs_sft"]), f"[{lo:.2f}, {hi:.2f}]"] + [
            _fmt(r.get(k)) for k in ("labeler_score", "hallucination_rate", "refusal_rate", "over_refusal_rate",
                                     "constraint_rate", "pretrain_val_loss")]
        lines.append("| " + " | ".join(cells) + " |")
    rm_acc = results.get("rm", {}).get("accuracy")
    lines += ["", f"Reward-model accuracy on held-out comparisons: {_fmt(rm_acc)} "
              "(the paper's reward models agreed with held-out labelers about 70% of the time).", ""]
    sft_loss = results["models"].get("sft", {}).get("pretrain_val_loss")
    if sft_loss is not None:
        chance = results.get("few_shot_chance")
        lines += ["## Alignment tax", "",
                  "Loss on held-out pretraining text, and few-shot accuracy on the world's facts (after two example "
                  "sentences, the likeliest of every town, colour, food, job or pet is the person's own"
                  + (f"; chance {chance:.3f}" if chance is not None else "") + "), against SFT.", "",
                  "| model | loss | change vs SFT | few-shot accuracy | change vs SFT |",
                  "| --- | --- | --- | --- | --- |"]
        sft_acc = results["models"]["sft"].get("few_shot_accuracy")
        for m in models:
            loss = results["models"][m].get("pretrain_val_loss")
            acc = results["models"][m].get("few_shot_accuracy")
            if loss is not None:
                acc_cells = (f"{acc:.3f} | {acc - sft_acc:+.3f}" if acc is not None and sft_acc is not None
                             else "- | -")
                lines.append(f"| {LABELS[m]} | {loss:.3f} | {loss - sft_loss:+.3f} | {acc_cells} |")
        lines.append("")
    lines += capability_section(results, models)
    lines += ["## Per task family", "", f"![families]({plots['families'].relative_to(run)})", "",
              "## Training curves", "", f"![losses]({plots['losses'].relative_to(run)})", "",
              f"![ppo]({plots['ppo'].relative_to(run)})", ""]
    if "grpo" in plots:
        lines += ["GRPO on the capability families, rewarded by the world's checker:", "",
                  f"![grpo]({plots['grpo'].relative_to(run)})", ""]
    lines += ["## Sample responses (greedy, held-out prompts)", ""]
    seen = set()
    for s in results.get("samples", []):
        if s["family"] in seen:
            continue
        seen.add(s["family"])
        lines += [f"**{_plain(s['family'])}**", ""]
        lines += quoted([("prompt", s["prompt"])] + [(LABELS[m], s.get(m, "")) for m in models])
        lines.append("")
    return "\n".join(lines) + "\n"


def _rate(figure: dict | None) -> str:
    """A rate and its 95% interval: "0.250 [0.12, 0.44]"."""
    if not figure or figure.get("rate") is None:
        return "-"
    lo, hi = figure["ci95"]
    return f"{figure['rate']:.3f} [{lo:.2f}, {hi:.2f}]"


def _change(figure: dict) -> str:
    """A signed change and its 95% interval: "+0.071 [+0.03, +0.11]"."""
    lo, hi = figure["ci95"]
    return f"{figure['diff']:+.3f} [{lo:+.2f}, {hi:+.2f}]"


def capability_section(results: dict, models: list[str]) -> list[str]:
    """Exact match per capability family (greedy replies, checked by the world's checker) and pass@k (sampled
    replies) of every model, with 95% intervals; nothing when the evaluation has no such figures."""
    rows = [m for m in models if results["models"][m].get("exact_match") is not None]
    if not rows:
        return []
    about = results.get("capability") or {}
    families = [f for f in about.get("families") or results["models"][rows[0]]["exact_match"]["per_family"]
                if any(f in results["models"][m]["exact_match"]["per_family"] for m in rows)]
    n = {f: max(results["models"][m]["exact_match"]["per_family"].get(f, {}).get("n", 0) for m in rows)
         for f in families}
    lines = ["## Capability families: exact match", "",
             "Greedy replies to the held-out prompts of the families with one checkable answer, checked by the world's "
             "checker (the reward of the GRPO stage). 95% Wilson intervals per family; the mean over families with a "
             "95% percentile bootstrap interval (resampled within each family); its change from SFT's with a paired "
             "bootstrap interval (the same prompts drawn for both models).", "",
             "| model | " + " | ".join(f"{_plain(f)} (n={n[f]})" for f in families) + " | mean | change vs SFT |",
             "| --- |" + " --- |" * (len(families) + 2)]
    for m in rows:
        em = results["models"][m]["exact_match"]
        change = em.get("vs_sft")
        lines.append(f"| {LABELS[m]} | " + " | ".join(_rate(em["per_family"].get(f)) for f in families)
                     + f" | {_rate(em['mean'])} | {_change(change) if change else '-'} |")
    lines.append("")
    passes = sorted({k for m in rows for k in (results["models"][m].get("pass_at_k") or {}) if k.startswith("pass@")},
                    key=lambda k: int(k.removeprefix("pass@")))
    setting = about.get("pass_at_k")
    if passes and setting:
        lines += ["## Capability families: pass@k", "",
                  f"{setting['n']} replies sampled at temperature {setting['temperature']} to each of "
                  f"{setting['prompts']} held-out prompts (the first {setting['per_family']} of each family), "
                  "checked as above; the unbiased estimator of Chen et al. (2021), with 95% percentile bootstrap "
                  "intervals over prompts.", "",
                  "| model | " + " | ".join(passes) + " |", "| --- |" + " --- |" * len(passes)]
        for m in rows:
            pk = results["models"][m].get("pass_at_k") or {}
            lines.append(f"| {LABELS[m]} | " + " | ".join(_rate(pk.get(k)) for k in passes) + " |")
        lines.append("")
    return lines


def quoted(rows: list[tuple[str, str]]) -> list[str]:
    """Labelled texts as one fenced code block: every line break of the text (\\n, \\r, U+2028, ...) starts an
    indented line inside the block, and other control characters are shown escaped. The fence is longer than
    any run of backticks in the text, so nothing in it can close the block."""
    width = max(len(label) for label, _ in rows) + 2
    body = []
    for label, text in rows:
        parts = [_CONTROL.sub(lambda m: ascii(m.group())[1:-1], part) for part in str(text).splitlines()] or [""]
        body.append(f"{label + ':':<{width}}{parts[0]}".rstrip())
        body += [(" " * width + part).rstrip() for part in parts[1:]]
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", "\n".join(body))), default=0))
    return [fence + "text", *body, fence]


# C0 and C1 control characters other than tab (line breaks are split off before): shown as \xNN
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _plain(text: str) -> str:
    """A task family's name as plain words (the world's names are; a foreign one loses anything else)."""
    return re.sub(r"[^\w -]", "?", str(text))


def to_html(md: str, run: Path, plots: dict[str, Path]) -> str:
    """A minimal Markdown-to-HTML rendering of the report (the Markdown `markdown` writes) with its plots
    inlined: an image line is embedded only if it names one of `plots`; fenced blocks are escaped text."""
    allowed = {str(path.relative_to(run)): path for path in plots.values()}
    body = []
    in_table = False
    fence, block = None, []
    for line in md.split("\n"):
        if fence is not None:  # inside a fenced block: text, until the line that is exactly its fence
            if line == fence:
                body.append("<pre><code>" + html.escape("\n".join(block)) + "</code></pre>")
                fence, block = None, []
            else:
                block.append(line)
            continue
        if line.startswith("```"):
            fence = "`" * (len(line) - len(line.lstrip("`")))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("- "):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        src = line[line.find("(") + 1:-1] if line.startswith("![") and line.endswith(")") else None
        if src in allowed:
            data = base64.b64encode(allowed[src].read_bytes()).decode()
            body.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(src)}">')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<div class='li'>{_inline(line[2:])}</div>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    if fence is not None:  # an unclosed block (never written by `markdown`): still text
        body.append("<pre><code>" + html.escape("\n".join(block)) + "</code></pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f5f5f5;padding:1px 4px}"
             "pre{background:#f5f5f5;padding:6px 10px;overflow-x:auto}.li{margin-left:1.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>instructgpt report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.*?)`", r"<code>\1</code>", text)


def report_command(run: Path) -> None:
    """Write RUN/report.md, RUN/report.html (self-contained) and RUN/plots/*.png from a run's files."""
    run = Path(run)
    results_path = run / "eval" / "results.json"
    if not results_path.exists():
        raise UserError(f"{results_path} does not exist: run `instructgpt eval --run {run}` first")
    results = read_json_file(results_path)
    manifest_path = run / "pipeline.json"
    manifest = read_json_file(manifest_path) if manifest_path.exists() else {}
    plots = make_plots(run, results)
    md = markdown(run, manifest, results, plots)
    page = to_html(md, run, plots)
    atomic_write(run / "report.md", lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
    atomic_write(run / "report.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    print(f"wrote {run / 'report.html'} and {run / 'report.md'}")
