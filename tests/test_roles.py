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


# The frozen Reasoner's answers to the three valid questions below, m = 4 each.
CANNED_ANSWERS = [["3", "3", "4", None], ["5", "5", "5", "5"], [None, None, "red", "blue"]]
# Hand-computed per (uncertainty scale and combine, count_empty), question by question (the second
# output is invalid; the first and third are the same question, one BLEU cluster of 2 out of G = 4):
#   confidence c  empty answers vote "None": [2/4, -, 4/4, 2/4 ("None" wins)]; not: [2/3, -, 1, 1/2]
#   uncertainty   paper 1 - |2c - 1|, code min(c, 1 - c); diversity [0.5, 0.25, 0.5, 0.25]
#   reward        paper valid · max(0, u - d); code u - d, or -1 - d when invalid
REWARD_CASES = [
    ("paper", True, [0.5, 0.0, 1.0, 0.5], [1.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.75]),
    ("code", True, [0.5, 0.0, 1.0, 0.5], [0.5, 0.0, 0.0, 0.5], [0.0, -1.25, -0.5, 0.25]),
    ("paper", False, [2 / 3, 0.0, 1.0, 0.5], [2 / 3, 0.0, 0.0, 1.0], [1 / 6, 0.0, 0.0, 0.75]),
    ("code", False, [2 / 3, 0.0, 1.0, 0.5], [1 / 3, 0.0, 0.0, 0.5], [-1 / 6, -1.25, -0.5, 0.25]),
]


@pytest.mark.parametrize("mode, count_empty, confidence, uncertainty, reward", REWARD_CASES)
def test_questioner_reward_from_the_reasoners_answers_hand_computed(tiny, monkeypatch, mode, count_empty, confidence,
                                                                    uncertainty, reward):
    model, tok, ip = tiny
    texts = ["<question>How many red shapes are there?</question>", "no tags here",
             "<question>How many red shapes are there?</question>", "<question>What colour is the square?</question>"]
    parsed = [parse_question(t) for t in texts]
    images = random_images(0, [(56, 56)] * 4)
    asked = []

    def frozen_reasoner(model, tokenizer, image_processor, images, questions, m, *args):
        asked.append((questions, m))
        answers = CANNED_ANSWERS[:len(questions)]
        return [[f"\\boxed{{{a}}}" if a else "no box" for a in group] for group in answers], answers
    monkeypatch.setattr(questioner.reasoner, "answer", frozen_reasoner)
    settings = questioner.QuestionerRewardSettings(m=4, uncertainty_scale=mode, combine=mode, count_empty=count_empty)
    rewards, details = questioner.score_questions(model, tok, ip, images, parsed, texts, [0, 0, 0, 0],
                                                  settings, SHORT, torch.Generator().manual_seed(0), 10**9)
    assert asked == [([texts[0][10:-11], texts[2][10:-11], texts[3][10:-11]], 4)], "only valid questions, m times"
    assert [d["answers"] for d in details] == [CANNED_ANSWERS[0], [], CANNED_ANSWERS[1], CANNED_ANSWERS[2]]
    assert [d["confidence"] for d in details] == pytest.approx(confidence)
    assert [d["uncertainty"] for d in details] == pytest.approx(uncertainty)
    assert [d["diversity"] for d in details] == [0.5, 0.25, 0.5, 0.25]
    assert rewards == pytest.approx(reward)


class Canned:
    """What sample_in_batches returns, with the texts given."""
    def __init__(self, texts):
        self.ids = torch.arange(len(texts) * 2).view(len(texts), 2)
        self.mask = torch.ones_like(self.ids)
        self.canned = texts

    def texts(self, tokenizer):
        return self.canned


@pytest.mark.parametrize("mode, expected", [("paper", [1, 0, 0, 1, 0, 0]), ("code", [1, 0, 0.1, 0.9, 0.1, 0])])
def test_reasoner_rollouts_score_each_row_against_its_own_questions_label(tiny, monkeypatch, mode, expected):
    model, tok, ip = tiny
    images = random_images(1, [(56, 56), (64, 80)])
    texts = ["<think>a</think> \\boxed{3}", "\\boxed{4}", "<think>b</think> \\boxed{4}",  # question one: "3"
             "\\boxed{4}", "<think>c</think>\\boxed{3}", "no box"]                        # question two: "4"
    monkeypatch.setattr(reasoner, "sample_in_batches", lambda model, prompts, max_tokens, n, **settings: Canned(texts))
    rollouts, returned = reasoner.rollouts(model, tok, ip, images, ["Q one?", "Q two?"], ["3", "4"], G=3,
                                           settings=SHORT, generator=None, batch_tokens=1, reward_mode=mode)
    assert returned == texts and rollouts.rewards.tolist() == pytest.approx(expected)
    assert rollouts.group_size == 3 and rollouts.max_new_tokens == SHORT.max_new_tokens
    assert torch.equal(rollouts.prompts.image_grid_thw, ip(images=images, return_tensors="pt")["image_grid_thw"]
                       .repeat_interleave(3, dim=0))


def test_rollouts_line_up_rows_with_groups(tiny):
    model, tok, ip = tiny
    images = random_images(1, [(56, 56), (64, 80)])
    rollouts, texts = reasoner.rollouts(model, tok, ip, images, ["Q one?", "Q two?"], ["3", "4"], G=3,
                                        settings=SHORT, generator=torch.Generator().manual_seed(0), batch_tokens=1)
    assert len(rollouts) == 6 == len(texts) and rollouts.rewards.shape == (6,)
    q_rollouts, details = questioner.rollouts(model, model, tok, ip, images, 2, SHORT, SHORT,
                                              questioner.QuestionerRewardSettings(m=2),
                                              torch.Generator().manual_seed(0), batch_tokens=1)
    assert len(q_rollouts) == 4 == len(details)
    assert q_rollouts.advantages().shape == (4,)
