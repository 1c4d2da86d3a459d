import math

import pytest
import torch

from instructgpt.data import Prompt
from instructgpt.evaluate import heldout_loss, summarise, wilson_interval, win_rate
from instructgpt.model import GPT, ModelConfig, Seq2Seq
from instructgpt.tokenizer import Tokenizer
from instructgpt.world.labeler import Labeler
from instructgpt.world.world import REFUSAL, build_world, demonstrate, make_prompts


def test_wilson_interval_contains_the_rate_and_shrinks_with_n():
    for wins, n in [(0, 10), (5, 10), (10, 10), (55, 100), (550, 1000)]:
        lo, hi = wilson_interval(wins, n)
        assert 0 <= lo <= wins / n <= hi <= 1
    assert wilson_interval(550, 1000)[1] - wilson_interval(550, 1000)[0] < wilson_interval(55, 100)[1] - \
        wilson_interval(55, 100)[0]
    assert wilson_interval(550, 1000)[0] > 0.5 > wilson_interval(55, 100)[0]


@pytest.mark.parametrize("arch", ["gpt", "seq2seq"])
def test_heldout_loss_of_an_untrained_model_is_near_uniform(tmp_path, arch):
    text = "the red fox sat by the river and the blue owl sang. " * 40
    tok = Tokenizer.train_bpe([text], vocab_size=300)
    path = tmp_path / "heldout.txt"
    path.write_text(text)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32, arch=arch)
    model = (Seq2Seq if arch == "seq2seq" else GPT)(cfg).eval()
    assert abs(heldout_loss(model, tok, path) - math.log(tok.vocab_size)) < 0.3


def world_records(n=60):
    world = build_world(seed=3)
    recs = make_prompts(world, "eval", n, seed=3)
    return world, recs, [Prompt(messages=[{"role": "user", "content": r["prompt"]}], meta=r) for r in recs]


def test_rates_count_what_they_name():
    world, recs, prompts = world_records()
    labeler = Labeler(world, seed=0)
    good = [(demonstrate(world, r), True) for r in recs]
    refuse_all = [(REFUSAL, True) for _ in recs]
    s_good, s_refuse = summarise(labeler, prompts, recs, good), summarise(labeler, prompts, recs, refuse_all)
    assert s_good["hallucination_rate"] == 0.0 and s_good["refusal_rate"] == 1.0
    assert s_good["over_refusal_rate"] == 0.0
    assert s_refuse["over_refusal_rate"] == 1.0 and s_refuse["refusal_rate"] == 1.0
    assert s_refuse["hallucination_rate"] == 1.0  # refusing is not saying "not known"
    assert s_good["labeler_score"] > s_refuse["labeler_score"]
    rate, (lo, hi) = win_rate(labeler, recs, good, refuse_all)
    assert rate > 0.75 and lo > 0.5
