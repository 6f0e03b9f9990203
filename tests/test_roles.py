"""The glue of the two roles: who answers what, how often, and how the rewards are put together."""

import numpy as np
import pytest
import torch
from conftest import random_images
from nltk.translate import bleu_score as nltk_bleu

import questioner
import reasoner
from model import Processors
from rewards import parse_question
from sampler import SamplingSettings, prompt_keys

SHORT = SamplingSettings(max_new_tokens=6)
KEYS = prompt_keys(0, n=16)  # random streams for the calls whose sampler is canned


class Canned:
    """What sample_in_batches returns, with the texts given."""
    def __init__(self, texts):
        self.ids = torch.arange(len(texts) * 2).view(len(texts), 2)
        self.mask = torch.ones_like(self.ids)
        self.canned = texts

    def texts(self, tokenizer):
        return self.canned


def boxed(answers):
    """The responses that give these answers (None: a response without a box)."""
    return [f"<think>so</think> \\boxed{{{a}}}" if a else "no box" for a in answers]


def test_curation_band_and_silver_labels_hand_computed(tiny, monkeypatch):
    model, tok, ip = tiny
    answers = [
        ["3", "3", "4", "5"],          # c = 2/4 = 0.5 -> kept
        ["3", "3", "3", "3"],          # c = 1 -> too easy
        ["1", "2", "3", "4"],          # c = 1/4 = 0.25 -> on the band's edge: kept
        [None, None, None, "7"],       # one non-empty answer: c = 1 -> dropped
        [None, None, None, None],      # no answer at all: no silver label
        ["B", "(B) red", "C", "C. blue"],  # two classes of 2: the first seen wins, c = 0.5
    ]
    texts = [f"<question>Q{i}?</question>" for i in range(3)] + ["no tags"] + [
        f"<question>Q{i}?</question>" for i in range(3, 6)]
    parsed = [parse_question(t) for t in texts]
    calls = []

    def sampler(model, prompts, max_tokens, n, **settings):
        calls.append((len(prompts), n))
        return Canned([r for group in answers for r in boxed(group)])
    monkeypatch.setattr(reasoner, "sample_in_batches", sampler)
    records = reasoner.curate(model, Processors(tok, ip), random_images(0, [(56, 56)] * 7), texts, parsed, m=4,
                              settings=SHORT, count_empty=False, tau_low=0.25, tau_high=0.75, keys=KEYS,
                              batch_tokens=1)
    assert calls == [(6, 4)], "the six valid candidates, m = 4 votes each"
    assert [(r["silver"], r["confidence"], r["kept"]) for r in records] == [
        ("3", 0.5, True), ("3", 1.0, False), ("1", 0.25, True), (None, 0.0, False), ("7", 1.0, False),
        (None, 0.0, False), ("B", 0.5, True)]
    assert [r["valid"] for r in records] == [True] * 3 + [False] + [True] * 3
    assert records[3]["answers"] == [] and records[0]["answers"] == answers[0]
    # Counting answers without a box as votes for "None": [None] * 3 + ["7"] has "None" at c = 0.75.
    monkeypatch.setattr(reasoner, "sample_in_batches", lambda *args, **kw: Canned(boxed(answers[3])))
    vote = reasoner.ask_and_vote(model, Processors(tok, ip), random_images(0, [(56, 56)]), ["Q?"], m=4,
                                 settings=SHORT, count_empty=True, keys=KEYS, batch_tokens=1)[0]
    assert (vote["confidence"], reasoner.in_band(vote["silver"], vote["confidence"], 0.25, 0.75)) == (0.75, False)


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
    ask_and_vote = reasoner.ask_and_vote

    def frozen_reasoner(model, processors, images, questions, **kw):
        asked.append((questions, kw["m"]))
        return ask_and_vote(model, processors, images, questions, **kw)
    monkeypatch.setattr(questioner.reasoner, "ask_and_vote", frozen_reasoner)
    monkeypatch.setattr(reasoner, "sample_in_batches", lambda model, prompts, max_tokens, n, **settings: Canned(
        [r for group in CANNED_ANSWERS for r in boxed(group)]))
    settings = questioner.QuestionerRewardSettings(m=4, uncertainty_scale=mode, combine=mode, count_empty=count_empty)
    rewards, details = questioner.score_questions(model, Processors(tok, ip), images, parsed, texts, [0, 0, 0, 0],
                                                  reward=settings, answer_settings=SHORT,
                                                  keys=KEYS, batch_tokens=10**9)
    assert asked == [([texts[0][10:-11], texts[2][10:-11], texts[3][10:-11]], 4)], "only valid questions, m times"
    assert [d["answers"] for d in details] == [CANNED_ANSWERS[0], [], CANNED_ANSWERS[1], CANNED_ANSWERS[2]]
    assert [d["confidence"] for d in details] == pytest.approx(confidence)
    assert [d["uncertainty"] for d in details] == pytest.approx(uncertainty)
    assert [d["diversity"] for d in details] == [0.5, 0.25, 0.5, 0.25]
    assert rewards == pytest.approx(reward)
    assert [d["reward"] for d in details] == rewards and [d["raw"] for d in details] == texts


@pytest.mark.parametrize("mode, expected", [("paper", [1, 0, 0, 1, 0, 0]), ("code", [1, 0, 0.1, 0.9, 0.1, 0])])
def test_reasoner_rollouts_score_each_row_against_its_own_questions_label(tiny, monkeypatch, mode, expected):
    model, tok, ip = tiny
    images = random_images(1, [(56, 56), (64, 80)])
    texts = ["<think>a</think> \\boxed{3}", "\\boxed{4}", "<think>b</think> \\boxed{4}",  # question one: "3"
             "\\boxed{4}", "<think>c</think>\\boxed{3}", "no box"]                        # question two: "4"
    monkeypatch.setattr(reasoner, "sample_in_batches", lambda model, prompts, max_tokens, n, **settings: Canned(texts))
    rollouts, episodes = reasoner.rollouts(model, Processors(tok, ip), images, ["Q one?", "Q two?"], ["3", "4"],
                                           G=3, settings=SHORT, keys=KEYS, batch_tokens=1, reward_mode=mode)
    assert rollouts.rewards.tolist() == pytest.approx(expected)
    assert [(e["question"], e["silver"]) for e in episodes] == [("Q one?", "3"), ("Q two?", "4")]
    logged = [a for e in episodes for a in e["answers"]]
    assert [a["response"] for a in logged] == texts and [a["reward"] for a in logged] == pytest.approx(expected)
    assert [a["answer"] for a in logged] == ["3", "4", "4", "4", "3", None] and [a["length"] for a in logged] == [2] * 6
    assert rollouts.group_size == 3 and rollouts.max_new_tokens == SHORT.max_new_tokens
    assert torch.equal(rollouts.prompts.image_grid_thw, ip(images=images, return_tensors="pt")["image_grid_thw"]
                       .repeat_interleave(3, dim=0))


def test_rollouts_line_up_rows_with_groups(tiny):
    model, tok, ip = tiny
    images = random_images(1, [(56, 56), (64, 80)])
    rollouts, episodes = reasoner.rollouts(model, Processors(tok, ip), images, ["Q one?", "Q two?"], ["3", "4"],
                                           G=3, settings=SHORT, reward_mode="paper",
                                           keys=prompt_keys(0, n=2), batch_tokens=1)
    assert len(rollouts) == 6 == sum(len(e["answers"]) for e in episodes) and rollouts.rewards.shape == (6,)
    q_rollouts, details = questioner.rollouts(model, model, Processors(tok, ip), images, G=2, fmt="paper",
                                              question_settings=SHORT, answer_settings=SHORT,
                                              reward=questioner.QuestionerRewardSettings(m=2),
                                              keys=prompt_keys(1, n=2), vote_keys=prompt_keys(2, n=4), batch_tokens=1)
    assert len(q_rollouts) == 4 == len(details) and [d["group"] for d in details] == [0, 0, 1, 1]
    assert q_rollouts.advantages().shape == (4,)


def test_curation_counting_empty_drops_empty_boxes_while_the_reward_counts_them(tiny, monkeypatch):
    # m = 5 votes: two empty boxes, "7" twice, one without a box. The public code's curation drops
    # the empty boxes before voting: "7" has 2 of 3. Its Questioner reward keeps them among the m:
    # 2 of 5. ("None", the missing box, is a candidate in both, with 1 vote.)
    model, tok, ip = tiny
    responses = ["<think>so</think> \\boxed{}", "<think>so</think> \\boxed{ }"] + boxed(["7", None, "7"])
    monkeypatch.setattr(reasoner, "sample_in_batches", lambda *args, **kw: Canned(responses))
    processors, images = Processors(tok, ip), random_images(0, [(56, 56)])
    texts, parsed = ["<question>Q?</question>"], [{"question": "Q?"}]
    record = reasoner.curate(model, processors, images, texts, parsed, m=5, settings=SHORT, count_empty=True,
                             tau_low=0.3, tau_high=0.8, keys=KEYS, batch_tokens=1)[0]
    assert record["silver"] == "7" and record["confidence"] == pytest.approx(2 / 3) and record["kept"]
    reward = questioner.QuestionerRewardSettings(m=5, count_empty=True)
    _, episodes = questioner.score_questions(model, processors, images, parsed, texts, [0], reward=reward,
                                             answer_settings=SHORT, keys=KEYS, batch_tokens=1)
    assert episodes[0]["silver"] == "7" and episodes[0]["confidence"] == pytest.approx(2 / 5)


def rewards_at_full_uncertainty(tiny, monkeypatch, texts, **settings):
    """The Questioner's rewards for one image's outputs when the Reasoner splits its m = 4 votes 2 / 2
    on every valid question: c = 0.5, paper uncertainty 1, so a valid output's reward is 1 - r_div
    (combine "code": also -1 - r_div for an invalid one)."""
    model, tok, ip = tiny
    monkeypatch.setattr(reasoner, "sample_in_batches", lambda model, prompts, max_tokens, n, **kw: Canned(
        boxed(["1", "2", "1", "2"]) * len(prompts)))
    rewards, _ = questioner.score_questions(
        model, Processors(tok, ip), random_images(0, [(56, 56)] * len(texts)), [parse_question(t) for t in texts],
        texts, [0] * len(texts), reward=questioner.QuestionerRewardSettings(m=4, **settings), answer_settings=SHORT,
        keys=KEYS, batch_tokens=1)
    return rewards


def test_diversity_invalid_switch(tiny, monkeypatch):
    # the second output is invalid (no tags) but its text is the first question word for word
    texts = ["<question>what color is the car</question>", "what color is the car",
             "<question>how many dogs are there</question>", "<question>which animal sleeps here</question>"]
    # raw (default): clusters {0, 1}, {2}, {3} of G = 4 -> r_div [1/2, 1/2, 1/4, 1/4]
    assert questioner.QuestionerRewardSettings().diversity_invalid == "raw"
    assert rewards_at_full_uncertainty(tiny, monkeypatch, texts, combine="code") == pytest.approx(
        [1 - 1 / 2, -1 - 1 / 2, 1 - 1 / 4, 1 - 1 / 4])
    # empty (public code): the invalid output is "", a cluster of its own -> r_div 1/4 each
    assert rewards_at_full_uncertainty(tiny, monkeypatch, texts, combine="code", diversity_invalid="empty") == \
        pytest.approx([1 - 1 / 4, -1 - 1 / 4, 1 - 1 / 4, 1 - 1 / 4])


def test_diversity_bleu_switch(tiny, monkeypatch):
    short, long = "what is the color of the large", "what is the color of large near the tree"
    smoothing = nltk_bleu.SmoothingFunction().method1

    def bleu(reference, hypothesis):
        return nltk_bleu.sentence_bleu([reference.split()], hypothesis.split(), smoothing_function=smoothing)
    # one direction is a near-duplicate (distance below 0.5), the other and the average are not
    assert 1 - bleu(long, short) < 0.5 <= 1 - bleu(short, long)
    assert 1 - (bleu(long, short) + bleu(short, long)) / 2 >= 0.5
    in_order = [f"<question>{short}</question>", f"<question>{long}</question>"]
    swapped = in_order[::-1]
    # symmetric (default): two clusters of one in a group of 2, r_div 1/2 each, in either order
    assert questioner.QuestionerRewardSettings().diversity_bleu == "symmetric"
    assert rewards_at_full_uncertainty(tiny, monkeypatch, in_order) == pytest.approx([0.5, 0.5])
    assert rewards_at_full_uncertainty(tiny, monkeypatch, swapped) == pytest.approx([0.5, 0.5])
    # one-sided (public code): d = 1 - BLEU(reference = the later, hypothesis = the earlier), so the
    # order decides: short first -> one cluster of 2, r_div 1, reward max(0, 1 - 1) = 0
    assert rewards_at_full_uncertainty(tiny, monkeypatch, in_order, diversity_bleu="one-sided") == [0.0, 0.0]
    assert rewards_at_full_uncertainty(tiny, monkeypatch, swapped, diversity_bleu="one-sided") == pytest.approx(
        [0.5, 0.5])


def test_random_silver_labels_are_uniform_over_the_distinct_answers_of_kept_questions():
    # five votes for 3 ("3.0" is the same answer), one each for 2 and 1, a missing and an empty box
    kept = {"answers": ["3", "3", "3.0", "3", "3", "2", "1", None, ""], "silver": "3", "kept": True}
    dropped = {"answers": ["4", "4", "4", "5"], "silver": "4", "kept": False}
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(3000):
        records = [dict(kept), dict(dropped)]
        reasoner.random_silver_labels(records, rng)
        assert records[1] == dropped  # only kept questions are relabelled
        drawn.append(records[0]["silver"])
    shares = {a: drawn.count(a) / len(drawn) for a in set(drawn)}
    # a third each, not 5/7 for the majority as a draw over the votes would give; never an empty answer
    assert set(shares) == {"1", "2", "3"} and all(abs(s - 1 / 3) < 0.04 for s in shares.values())
