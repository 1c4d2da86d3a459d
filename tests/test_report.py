"""The report quotes prompts and model replies, which are anyone's text, in a file made to be shared: no such
text can start a Markdown line, and report.html embeds the plots `make_plots` drew and nothing else. The
Markdown is also read by a real CommonMark parser (markdown-it, which rich depends on) as the slow,
obviously right twin of `to_html`."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from instructgpt.checkpoint import write_json_atomic
from instructgpt.errors import UserError
from instructgpt.records import read_json_file
from instructgpt.report import LABELS, markdown, quoted, report_command, to_html

MODELS = ("pretrained", "sft", "ppo")


def figures(rate: float) -> dict:
    return {"win_rate_vs_sft": rate, "win_rate_ci95": [rate - 0.1, rate + 0.1], "labeler_score": 0.5,
            "hallucination_rate": 0.1, "refusal_rate": 0.9, "over_refusal_rate": 0.2, "constraint_rate": 0.3,
            "pretrain_val_loss": 2.0 + rate, "few_shot_accuracy": 0.4,
            "per_family": {"arithmetic": {"labeler_score": rate, "correct": rate, "n": 2}}}


def make_run(root: Path, replies: dict[str, str], prompt: str = "What is 2 + 3?") -> Path:
    """A run folder with what `report` reads: eval/results.json (one sample) and pipeline.json."""
    run = root / "run"
    results = {"models": {m: figures(0.5 + 0.1 * i) for i, m in enumerate(MODELS)}, "rm": {"accuracy": 0.6},
               "prompts": 2, "few_shot_chance": 0.1,
               "samples": [{"prompt": prompt, "family": "arithmetic", **{m: replies.get(m, "5") for m in MODELS}},
                           {"prompt": "again", "family": "arithmetic", **{m: "x" for m in MODELS}}]}
    write_json_atomic(run / "eval" / "results.json", results)
    write_json_atomic(run / "pipeline.json", {"preset": "smoke", "seed": 0, "stage_seconds": {"eval": 1.5}})
    return run


def images(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)


def test_a_reply_naming_a_local_file_does_not_put_the_file_into_the_report(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-BYTES")
    run = make_run(tmp_path, {"sft": "\n![x](/etc/hostname)\n", "ppo": f"fine\n![x]({secret})\n",
                              "pretrained": "\n![x](eval/results.json)\n"}, prompt=f"\n![p]({secret})\n")
    report_command(run)
    page = (run / "report.html").read_text()
    plots = sorted((run / "plots").glob("*.png"))
    assert len(plots) == 4
    # exactly the four plots are embedded, byte for byte; nothing else is
    assert sorted(images(page)) == sorted("data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
                                          for p in plots)
    for leaked in (b"TOP-SECRET-BYTES", (run / "eval" / "results.json").read_bytes()):
        assert base64.b64encode(leaked).decode() not in page
    if Path("/etc/hostname").is_file() and Path("/etc/hostname").read_bytes().strip():
        assert base64.b64encode(Path("/etc/hostname").read_bytes()).decode() not in page
    assert "![x](/etc/hostname)" in page  # the reply is shown, as text
    md = (run / "report.md").read_text()
    assert not any(line.startswith("![x]") or line.startswith("![p]") for line in md.splitlines())


def test_a_web_image_in_a_reply_is_text_and_does_not_break_the_report(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"sft": "![logo](https://example.com/a.png)", "ppo": "see ![logo](https://x.y/b.png)"})
    report_command(run)  # was: FileNotFoundError, and the pipeline's last stage failed
    page = (run / "report.html").read_text()
    assert len(images(page)) == 4 and all(src.startswith("data:image/png;base64,") for src in images(page))
    assert "![logo](https://example.com/a.png)" in page
    rendered = MarkdownIt().render((run / "report.md").read_text())  # what a Markdown viewer would show
    assert "example.com" in rendered and not re.search(r"<img [^>]*example\.com", rendered)


def test_a_torn_results_file_is_an_error_naming_it(tmp_path: Path) -> None:
    run = make_run(tmp_path, {})
    path = run / "eval" / "results.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(UserError, match=re.escape(str(path)) + r":\d+: not valid JSON"):
        report_command(run)


def test_the_report_reads_preset_seed_and_seconds_from_pipeline_json(tmp_path: Path) -> None:
    run = make_run(tmp_path, {})
    report_command(run)
    md = (run / "report.md").read_text()
    assert "Preset `smoke`, seed 0, 2 held-out prompts." in md and "| eval | 1.5 |" in md


# Text a model may write: line breaks of every kind, backticks and fences, Markdown that would start a line
# (images, headings, lists, tables, HTML), control characters.
hostile = st.lists(st.sampled_from(["\n", "\r\n", "\r", "\u2028", "\x85", "\x0c", "`", "```", "````", "~~~",
                                    "![a](/etc/passwd)", "# h", "- li", "| a | b |", "<img src=x>", "**b**",
                                    "\x1b[2J", "\x00", " ", "word", "é", "\t"]), max_size=12).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=hostile, replies=st.lists(hostile, min_size=len(MODELS), max_size=len(MODELS)))
def test_quoted_text_stays_inside_one_code_block(tmp_path: Path, prompt: str, replies: list[str]) -> None:
    results = {"models": {m: figures(0.5) for m in MODELS}, "prompts": 1,
               "samples": [{"prompt": prompt, "family": "arithmetic", **dict(zip(MODELS, replies))}]}
    plots = {k: tmp_path / "plots" / f"{k}.png" for k in ("win_rate", "families", "losses", "ppo")}
    md = markdown(tmp_path, {"preset": "smoke", "seed": 0}, results, plots)
    section = md[md.index("## Sample responses"):]
    # a CommonMark parser sees one code block holding every quoted line, and no image, heading or list in it
    tokens = MarkdownIt().parse(section)
    assert [t.type for t in tokens if t.type in ("fence", "code_block", "image", "heading_open")] == [
        "heading_open", "fence"]
    fence = next(t for t in tokens if t.type == "fence")
    labels = ["prompt", *(LABELS[m] for m in MODELS)]
    texts = [prompt, *replies]
    lines = fence.content.split("\n")[:-1]  # the content ends with a line break
    assert [line.split(":")[0] for line in lines if line and not line.startswith(" ")] == labels
    # every character of the text survives (line breaks become indented lines; controls are escaped)
    assert "".join("".join(lines).split()) == "".join("".join(
        f"{label}:" + "".join(escaped(part) for part in text.splitlines())
        for label, text in zip(labels, texts)).split())  # blanks aside: lines lose their trailing ones
    # our renderer agrees: one <pre> holding the same lines, the only images those of `plots`
    page = to_html(section, tmp_path, plots)
    assert page.count("<pre><code>") == 1 and "<img" not in page
    assert quoted(list(zip(labels, texts)))[1:-1] == lines


def escaped(part: str) -> str:
    return re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda m: ascii(m.group())[1:-1], part)


def capability_figures(rate: float) -> dict:
    """A model's exact match and pass@k as `evaluate` writes them."""
    fam = {"n": 4, "correct": int(4 * rate), "rate": rate, "ci95": [rate / 2, (1 + rate) / 2]}
    mean = {"rate": rate, "ci95": [0.1, 0.9]}
    return {"exact_match": {"per_family": {"arithmetic": fam, "count": fam}, "mean": mean},
            "pass_at_k": {"prompts": 4, "samples": 8, "pass@1": {"rate": rate, "ci95": [0.0, 0.5]},
                          "pass@4": {"rate": 2 * rate, "ci95": [0.1, 0.8]}}}


def test_the_report_shows_exact_match_and_pass_at_k_of_every_model_and_the_grpo_curves(tmp_path: Path) -> None:
    run = make_run(tmp_path, {})
    results = read_json_file(run / "eval" / "results.json")
    models = ("sft", "grpo")
    results["models"] = {m: figures(0.5) | capability_figures(0.25 * (i + 1)) for i, m in enumerate(models)}
    results["models"]["grpo"]["exact_match"]["vs_sft"] = {"diff": 0.25, "ci95": [0.05, 0.45]}
    results["samples"] = [s | {"grpo": "5"} for s in results["samples"]]
    sampling = {"per_family": 2, "n": 8, "k": 4, "seed": 0, "prompts": 4, "temperature": 1.0}
    results["capability"] = {"families": ["arithmetic", "reverse", "count"], "pass_at_k": sampling}
    write_json_atomic(run / "eval" / "results.json", results)
    (run / "grpo").mkdir()
    (run / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "reward": 0.1 * s, "kl": 0.01 * s, "completion_length": 20 - s}) + "\n" for s in range(1, 6)))
    report_command(run)
    page, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    assert len(images(page)) == 5 and (run / "plots" / "grpo.png").is_file()
    assert "![grpo](plots/grpo.png)" in md

    def table(title: str) -> list[list[str]]:  # the first table after the heading, as a CommonMark parser reads it
        tokens = MarkdownIt().enable("table").parse(md[md.index(title):])
        rows, row = [], None
        for t in tokens:
            if t.type == "tr_open":
                row = []
            elif t.type == "inline" and row is not None:
                row.append(t.content)
            elif t.type == "tr_close":
                rows.append(row)
                row = None
            elif t.type == "table_close":
                break
        return rows

    # the families the evaluation names, in its order, if any model has figures for them
    assert table("## Capability families: exact match") == [
        ["model", "arithmetic (n=4)", "count (n=4)", "mean", "change vs SFT"],
        ["SFT", "0.250 [0.12, 0.62]", "0.250 [0.12, 0.62]", "0.250 [0.10, 0.90]", "-"],
        ["GRPO", "0.500 [0.25, 0.75]", "0.500 [0.25, 0.75]", "0.500 [0.10, 0.90]", "+0.250 [+0.05, +0.45]"]]
    assert table("## Capability families: pass@k") == [
        ["model", "pass@1", "pass@4"], ["SFT", "0.250 [0.00, 0.50]", "0.500 [0.10, 0.80]"],
        ["GRPO", "0.500 [0.00, 0.50]", "1.000 [0.10, 0.80]"]]
    assert "8 replies sampled at temperature 1.0 to each of 4 held-out prompts" in md
    assert "<td>GRPO</td><td>0.500 [0.25, 0.75]</td>" in page


def test_a_report_of_results_without_capability_figures_has_no_such_section(tmp_path: Path) -> None:
    run = make_run(tmp_path, {})  # results.json of an evaluation from before exact match and pass@k
    report_command(run)
    md = (run / "report.md").read_text()
    assert "Capability families" not in md and "grpo" not in md
    assert len(images((run / "report.html").read_text())) == 4
