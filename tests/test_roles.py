"""The glue of the two roles: who answers what, how often, and how the rewards are put together."""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import random_images
from nltk.translate import bleu_score as nltk_bleu

import questioner
import reasoner
from machinery.batch import Batch
from machinery.keys import prompt_keys
from model import Processors
from reasoner import Vote
from rewards import parse_question, reasoner_reward
from sampler import Sampler, SamplingSettings, Samples

SHORT = SamplingSettings(max_new_tokens=6)


class Canned(Sampler):
    """A Sampler whose completions are given (`texts`, or texts(number of prompts)): its prompts are
    encoded as the real one's, and every call is recorded as (prompts, n)."""
    def __init__(self, tiny, texts):
        model, tok, ip = tiny
        super().__init__(model, Processors(tok, ip))
        self.canned, self.calls = texts, []

    def __call__(self, images, texts, *, n, settings, keys):
        self.calls.append((len(texts), n))
        out = self.canned(len(texts)) if callable(self.canned) else self.canned
        ids = torch.arange(len(out) * 2).view(len(out), 2)
        return self.processors.encode(images, texts), Samples(ids, torch.ones_like(ids), torch.zeros(ids.shape)), out


class Pictures(list):
    """Images as a Batch reads a run's: by index, with a path each."""
    @property
    def paths(self):
        return [f"picture_{i}.png" for i in range(len(self))]


def batch_of(images, items=None, index=None):
    """One process's Batch of the images (items: their indices), or of `items` about them."""
    return Batch(list(range(len(images))) if items is None else items, Pictures(images), 0, (1, 1), index)


def boxed(answers):
    """The responses that give these answers (None: a response without a box)."""
    return [f"<think>so</think> \\boxed{{{a}}}" if a else "no box" for a in answers]


def test_curation_band_and_silver_labels_hand_computed(tiny):
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
    R = Canned(tiny, [r for group in answers for r in boxed(group)])
    records = reasoner.curate(R, batch_of(random_images(0, [(56, 56)] * 7)), texts, parsed,
                              vote=Vote(m=4, sampling=SHORT, count_empty=False, count_empty_boxes=False),
                              band=(0.25, 0.75))
    assert R.calls == [(6, 4)], "the six valid candidates, m = 4 votes each"
    assert [(r["silver"], r["confidence"], r["kept"]) for r in records] == [
        ("3", 0.5, True), ("3", 1.0, False), ("1", 0.25, True), (None, 0.0, False), ("7", 1.0, False),
        (None, 0.0, False), ("B", 0.5, True)]
    assert [r["valid"] for r in records] == [True] * 3 + [False] + [True] * 3
    assert records[3]["answers"] == [] and records[0]["answers"] == answers[0]
    # Counting answers without a box as votes for "None": [None] * 3 + ["7"] has "None" at c = 0.75.
    vote = reasoner.ask_and_vote(Canned(tiny, boxed(answers[3])), random_images(0, [(56, 56)]), ["Q?"],
                                 prompt_keys(0, n=1), Vote(m=4, sampling=SHORT, count_empty=True))[0]
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
    texts = ["<question>How many red shapes are there?</question>", "no tags here",
             "<question>How many red shapes are there?</question>", "<question>What colour is the square?</question>"]
    parsed = [parse_question(t) for t in texts]
    asked = []
    ask_and_vote = reasoner.ask_and_vote

    def frozen_reasoner(R, images, questions, keys, vote):
        asked.append((questions, vote.m))
        return ask_and_vote(R, images, questions, keys, vote)
    monkeypatch.setattr(questioner, "ask_and_vote", frozen_reasoner)
    R = Canned(tiny, [r for group in CANNED_ANSWERS for r in boxed(group)])
    settings = questioner.QuestionerRewardSettings(vote=Vote(m=4, sampling=SHORT, count_empty=count_empty),
                                                   uncertainty_scale=mode, combine=mode)
    rewards, details = questioner.score_questions(R, batch_of(random_images(0, [(56, 56)])), parsed, texts,
                                                  reward=settings)
    assert asked == [([texts[0][10:-11], texts[2][10:-11], texts[3][10:-11]], 4)], "only valid questions, m times"
    assert [d["answers"] for d in details] == [CANNED_ANSWERS[0], [], CANNED_ANSWERS[1], CANNED_ANSWERS[2]]
    assert [d["confidence"] for d in details] == pytest.approx(confidence)
    assert [d["uncertainty"] for d in details] == pytest.approx(uncertainty)
    assert [d["diversity"] for d in details] == [0.5, 0.25, 0.5, 0.25]
    assert rewards == pytest.approx(reward)
    assert [d["reward"] for d in details] == rewards and [d["raw"] for d in details] == texts


@pytest.mark.parametrize("mode, expected", [("paper", [1, 0, 0, 1, 0, 0]), ("code", [1, 0, 0.1, 0.9, 0.1, 0])])
def test_reasoner_rollouts_score_each_row_against_its_own_questions_label(tiny, mode, expected):
    _, _, ip = tiny
    images = random_images(1, [(56, 56), (64, 80)])
    texts = ["<think>a</think> \\boxed{3}", "\\boxed{4}", "<think>b</think> \\boxed{4}",  # question one: "3"
             "\\boxed{4}", "<think>c</think>\\boxed{3}", "no box"]                        # question two: "4"
    kept = [{"question": "Q one?", "silver": "3", "image_index": 0},
            {"question": "Q two?", "silver": "4", "image_index": 1}]
    rollouts, episodes = reasoner.rollouts(Canned(tiny, texts), batch_of(images, kept, lambda r: r["image_index"]),
                                           partial(reasoner_reward, mode=mode), G=3, settings=SHORT)
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
    role = Sampler(model, Processors(tok, ip), batch_tokens=1)
    kept = [{"question": "Q one?", "silver": "3", "image_index": 0},
            {"question": "Q two?", "silver": "4", "image_index": 1}]
    rollouts, episodes = reasoner.rollouts(role, batch_of(images, kept, lambda r: r["image_index"]),
                                           partial(reasoner_reward, mode="paper"), G=3, settings=SHORT)
    assert len(rollouts) == 6 == sum(len(e["answers"]) for e in episodes) and rollouts.rewards.shape == (6,)
    reward = partial(questioner.score_questions, role,
                     reward=questioner.QuestionerRewardSettings(vote=Vote(m=2, sampling=SHORT)))
    q_rollouts, details = questioner.rollouts(role, batch_of(images), reward, G=2, settings=SHORT, fmt="paper")
    paths = Pictures(images).paths
    assert len(q_rollouts) == 4 == len(details) and [d["image"] for d in details] == [paths[0]] * 2 + [paths[1]] * 2
    assert q_rollouts.advantages().shape == (4,)


def test_curation_counting_empty_drops_empty_boxes_while_the_reward_counts_them(tiny):
    # m = 5 votes: two empty boxes, "7" twice, one without a box. The public code's curation drops
    # the empty boxes before voting: "7" has 2 of 3. Its Questioner reward keeps them among the m:
    # 2 of 5. ("None", the missing box, is a candidate in both, with 1 vote.)
    responses = ["<think>so</think> \\boxed{}", "<think>so</think> \\boxed{ }"] + boxed(["7", None, "7"])
    batch = batch_of(random_images(0, [(56, 56)]))
    texts, parsed = ["<question>Q?</question>"], [{"question": "Q?"}]
    record = reasoner.curate(Canned(tiny, responses), batch, texts, parsed,
                             vote=Vote(m=5, sampling=SHORT, count_empty=True, count_empty_boxes=False),
                             band=(0.3, 0.8))[0]
    assert record["silver"] == "7" and record["confidence"] == pytest.approx(2 / 3) and record["kept"]
    reward = questioner.QuestionerRewardSettings(vote=Vote(m=5, sampling=SHORT, count_empty=True))
    _, episodes = questioner.score_questions(Canned(tiny, responses), batch, parsed, texts, reward=reward)
    assert episodes[0]["silver"] == "7" and episodes[0]["confidence"] == pytest.approx(2 / 5)


def rewards_at_full_uncertainty(tiny, texts, **settings):
    """The Questioner's rewards for one image's outputs when the Reasoner splits its m = 4 votes 2 / 2
    on every valid question: c = 0.5, paper uncertainty 1, so a valid output's reward is 1 - r_div
    (combine "code": also -1 - r_div for an invalid one)."""
    R = Canned(tiny, lambda prompts: boxed(["1", "2", "1", "2"]) * prompts)
    rewards, _ = questioner.score_questions(
        R, batch_of(random_images(0, [(56, 56)])), [parse_question(t) for t in texts], texts,
        reward=questioner.QuestionerRewardSettings(vote=Vote(m=4, sampling=SHORT), **settings))
    return rewards


def test_diversity_invalid_switch(tiny):
    # the second output is invalid (no tags) but its text is the first question word for word
    texts = ["<question>what color is the car</question>", "what color is the car",
             "<question>how many dogs are there</question>", "<question>which animal sleeps here</question>"]
    # raw (default): clusters {0, 1}, {2}, {3} of G = 4 -> r_div [1/2, 1/2, 1/4, 1/4]
    assert questioner.QuestionerRewardSettings().diversity_invalid == "raw"
    assert rewards_at_full_uncertainty(tiny, texts, combine="code") == pytest.approx(
        [1 - 1 / 2, -1 - 1 / 2, 1 - 1 / 4, 1 - 1 / 4])
    # empty (public code): the invalid output is "", a cluster of its own -> r_div 1/4 each
    assert rewards_at_full_uncertainty(tiny, texts, combine="code", diversity_invalid="empty") == \
        pytest.approx([1 - 1 / 4, -1 - 1 / 4, 1 - 1 / 4, 1 - 1 / 4])


def test_diversity_bleu_switch(tiny):
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
    assert rewards_at_full_uncertainty(tiny, in_order) == pytest.approx([0.5, 0.5])
    assert rewards_at_full_uncertainty(tiny, swapped) == pytest.approx([0.5, 0.5])
    # one-sided (public code): d = 1 - BLEU(reference = the later, hypothesis = the earlier), so the
    # order decides: short first -> one cluster of 2, r_div 1, reward max(0, 1 - 1) = 0
    assert rewards_at_full_uncertainty(tiny, in_order, diversity_bleu="one-sided") == [0.0, 0.0]
    assert rewards_at_full_uncertainty(tiny, swapped, diversity_bleu="one-sided") == pytest.approx(
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


# -----------------------------------------------------------------------------
# Which random streams each role function draws from (Batch.keys), and Batch itself

class Recording(Canned):
    """Valid questions to the Questioner's prompt and boxed answers to the Reasoner's, recording the
    keys of every call."""
    def __init__(self, tiny):
        super().__init__(tiny, None)
        self.keys = []

    def __call__(self, images, texts, *, n, settings, keys):
        self.keys.append(keys.values.tolist())
        asked = texts[0] != questioner.QUESTIONER_PROMPTS["paper"]
        self.canned = ["\\boxed{1}" if asked else f"<question>Q{i}?</question>" for i in range(len(texts) * n)]
        return super().__call__(images, texts, n=n, settings=settings, keys=keys)


def test_each_sampling_site_draws_its_own_streams(tiny):
    """The streams of a step are keys.prompt_keys of (seed, site name, iteration, step), one per prompt
    of the whole batch (per G or m rows where each row is asked on): what makes resume and any
    number of processes give the same samples. A site mixed up with another would pass every test
    that compares two runs."""
    images = random_images(1, [(56, 56), (64, 80)])
    role = Recording(tiny)
    vote = Vote(m=2, sampling=SHORT)
    reward = partial(questioner.score_questions, role, reward=questioner.QuestionerRewardSettings(vote=vote))
    _, details = questioner.rollouts(role, batch_of(images), reward, G=2, settings=SHORT, fmt="paper")
    assert all(d["valid"] for d in details)  # so each of the 2 x G questions is voted on, from its own stream
    assert role.keys == [prompt_keys(0, "questions", 1, 1, n=2).values.tolist(),
                         prompt_keys(0, "votes", 1, 1, n=4).values.tolist()]
    role.keys.clear()
    kept = [{"question": "Q?", "silver": "3", "image_index": 1}]
    reasoner.rollouts(role, batch_of(images, kept, lambda r: r["image_index"]), partial(reasoner_reward), G=2,
                      settings=SHORT)
    assert role.keys == [prompt_keys(0, "answers", 1, 1, n=1).values.tolist()]


def test_curation_chunks_draw_the_whole_pools_streams(tiny):
    """The candidate votes of the second chunk of a pool are the pool's streams at its positions."""
    pool = batch_of(random_images(2, [(56, 56)] * 3))
    role = Recording(tiny)
    texts = ["<question>A?</question>", "<question>B?</question>"]
    reasoner.curate(role, pool.chunks(2)[1], texts, [parse_question(t) for t in texts], vote=Vote(m=2, sampling=SHORT),
                    band=(0.0, 1.0))
    assert role.keys == [prompt_keys(0, "candidate votes", 1, 1, n=6).values.tolist()[4:6]]


class Counted(Pictures):
    decoded = 0

    def __getitem__(self, i):
        Counted.decoded += 1
        return super().__getitem__(i)


def test_a_batch_decodes_its_images_when_asked_once_and_a_pool_by_chunk():
    images = Counted(random_images(3, [(56, 56)] * 5))
    pool = Batch(list(range(5)), images, 0, (1,))
    assert Counted.decoded == 0, "a pool decodes nothing until a chunk asks"
    chunks = pool.chunks(2)
    assert [c.items for c in chunks] == [[0, 1], [2, 3], [4]] and Counted.decoded == 0
    assert chunks[1].images == chunks[1].images and Counted.decoded == 2, "decoded once, then kept"
    assert [c.paths for c in chunks][2] == ["picture_4.png"]
    keys = pool.keys("site", per=3).values
    assert torch.equal(torch.cat([c.keys("site", per=3).values for c in chunks]), keys)


def test_keys_index_by_slice_positions_and_mask():
    keys = prompt_keys(0, n=5)
    values = keys.values
    assert torch.equal(keys[1:3].values, values[1:3]) and torch.equal(keys[[4, 0]].values, values[[4, 0]])
    mask = torch.tensor([True, False, True, False, False])
    assert torch.equal(keys[mask].values, values[[0, 2]]) and len(keys[[]]) == 0
