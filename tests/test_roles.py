"""The glue of the two roles: who answers what, how often, and how the rewards are put together."""

import pytest
import torch
from conftest import random_images

import questioner
import reasoner
from rewards import parse_question
from sampler import SamplingSettings

SHORT = SamplingSettings(max_new_tokens=6)


def test_curation_band_and_silver_labels_hand_computed():
    answers = [
        ["3", "3", "4", "5"],          # c = 2/4 = 0.5 -> kept
        ["3", "3", "3", "3"],          # c = 1 -> too easy
        ["1", "2", "3", "4"],          # c = 1/4 = 0.25 -> on the band's edge: kept
        [None, None, None, "7"],       # one non-empty answer: c = 1 -> dropped
        [None, None, None, None],      # no answer at all: no silver label
        ["B", "(B) red", "C", "C. blue"],  # two classes of 2: the first seen wins, c = 0.5
    ]
    records = reasoner.curate(answers, tau_low=0.25, tau_high=0.75)
    assert [(r["silver"], r["confidence"], r["kept"]) for r in records] == [
        ("3", 0.5, True), ("3", 1.0, False), ("1", 0.25, True), ("7", 1.0, False), (None, 0.0, False),
        ("B", 0.5, True)]
    counted = reasoner.curate(answers[3:4], tau_low=0.25, tau_high=0.75, count_empty=True)
    assert (counted[0]["silver"], counted[0]["confidence"], counted[0]["kept"]) == (None, 0.75, False)


@pytest.mark.parametrize("combine", ["paper", "code"])
def test_questioner_reward_wiring(tiny, combine):
    model, tok, ip = tiny
    texts = ["<question>How many red shapes are there?</question>", "no tags here",
             "<question>How many red shapes are there?</question>", "<question>What colour is the square?</question>"]
    parsed = [parse_question(t) for t in texts]
    images = random_images(0, [(56, 56)] * 4)
    settings = questioner.QuestionerRewardSettings(m=3, combine=combine)
    calls = []
    original = reasoner.answer

    def spy(*args, **kwargs):
        calls.append(args[4])
        return original(*args, **kwargs)

    reasoner.answer, questioner.reasoner.answer = spy, spy
    try:
        rewards, details = questioner.score_questions(model, tok, ip, images, parsed, texts, [0, 0, 0, 0],
                                                      settings, SHORT, torch.Generator().manual_seed(0), 10**9)
    finally:
        reasoner.answer = original
    assert calls == [[texts[0][10:-11], texts[2][10:-11], texts[3][10:-11]]], "only valid questions are answered"
    assert [len(d["answers"]) for d in details] == [3, 0, 3, 3]
    # two identical questions form one cluster of 2 out of G = 4; the others are alone
    assert [d["diversity"] for d in details] == [0.5, 0.25, 0.5, 0.25]
    for d, r in zip(details, rewards):
        u = 1 - abs(2 * d["confidence"] - 1) if d["valid"] else 0.0
        assert d["uncertainty"] == pytest.approx(u)
        if combine == "paper":
            expected = max(0.0, u - d["diversity"]) if d["valid"] else 0.0
        else:
            expected = u - d["diversity"] if d["valid"] else -1 - d["diversity"]
        assert r == pytest.approx(expected)


def test_rollouts_line_up_rows_with_groups(tiny):
    model, tok, ip = tiny
    images = random_images(1, [(56, 56), (64, 80)])
    rollouts, texts = reasoner.rollouts(model, tok, ip, images, ["Q one?", "Q two?"], ["3", "4"], G=3,
                                        settings=SHORT, generator=torch.Generator().manual_seed(0), batch_tokens=1)
    assert len(rollouts) == 6 == len(texts) and rollouts.rewards.shape == (6,)
    assert torch.equal(rollouts.prompts.image_grid_thw, ip(images=images, return_tensors="pt")["image_grid_thw"]
                       .repeat_interleave(3, dim=0))
    q_rollouts, details = questioner.rollouts(model, model, tok, ip, images, 2, SHORT, SHORT,
                                              questioner.QuestionerRewardSettings(m=2),
                                              torch.Generator().manual_seed(0), batch_tokens=1)
    assert len(q_rollouts) == 4 == len(details)
    assert q_rollouts.advantages().shape == (4,)
