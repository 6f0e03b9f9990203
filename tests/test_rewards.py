"""Tests for rewards.py. nltk and scikit-learn are the references for BLEU and clustering; every
other expected value below is worked out by hand (the reasoning sits next to the case)."""

import itertools
import math
import os
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rewards import (  # noqa: E402
    answers_equivalent, bleu_distance_matrix, bleu_matrix, cluster_ids, cluster_ids_from_distances,
    diversity_penalty, extract_boxed, format_ok, majority_vote, normalize_answer, parse_question,
    questioner_reward, reasoner_reward, sentence_bleu, uncertainty_reward,
)

from nltk.translate import bleu_score as nltk_bleu  # noqa: E402
from sklearn import cluster as sklearn_cluster  # noqa: E402

# -----------------------------------------------------------------------------
# extraction

EXTRACT_CASES = [
    (r"The answer is \boxed{42}.", "42"),
    (r"first \boxed{1}, then \boxed{2}", "2"),                 # the last box wins
    (r"\boxed{}", ""),                                         # empty box -> "" (no answer)
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),                  # nested braces
    (r"\boxed{\text{\textbf{B}}}", r"\text{\textbf{B}}"),
    (r"\boxed {7}", None),                                     # space before the brace: no box
    (r"\boxed{3} then \boxed {4}", "3"),                       # ... so the last box is the 3
    (r"\boxed{3", None),                                       # never closes
    (r"\boxed{1} and later \boxed{2", None),                   # last box truncated: no fallback
    ("no box here", None),
    ("", None),
    (None, None),
    (r"\boxed{a}}", "a"),                                      # stray closing brace after the box
    (r"\boxed{\boxed{5}}", "5"),                               # the inner box starts last
    (r"\boxed{{x}}", "{x}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                          # escaped braces come in pairs
    (r"\fbox{3}", None),
    ("\\boxed{line\nbreak}", "line\nbreak"),
]


@pytest.mark.parametrize("text, expected", EXTRACT_CASES)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("  Red   Car. ", "red car"),
    (r"$\text{ The \textbf{Red}  Car.}$", "the red car"),
    (r"\mathrm{cm}", "cm"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    ("\u22123", "-3"),
    (r"1\,000", "1000"),
    (r"\text{unclosed", r"\text{unclosed"),                    # unbalanced wrapper kept as written
    (None, ""),
    ("   ", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected

# -----------------------------------------------------------------------------
# equivalence

EQUIV_CASES = [
    # numbers
    ("0.5", "1/2", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac{1}{2}", ".50", True),
    (r"\frac12", "0.5", True),
    ("1 / 2", "0.5", True),
    ("1,000", "1000", True),
    ("1,000.5", "1000.5", True),
    ("-3", "\u22123", True),                                   # unicode minus
    ("50%", "50", True),
    (r"50\%", "50", True),
    ("3", "3.0", True),
    ("3.", "3", True),                                         # trailing period
    (r"-\frac{1}{2}", "-0.5", True),
    (r"\frac{-1}{2}", "-1/2", True),
    ("$4$", "4", True),
    ("$4$.", "4", True),
    (r"\text{4}", "4", True),
    ("1e3", "1000", True),
    ("30°", r"30^\circ", True),
    ("1000000", "1000000.5", True),                            # relative gap 5e-7 < 1e-6
    ("1000000", "1000001", False),                             # two whole numbers: exactly
    ("123456789", "1.2345679e8", False),
    ("1,000,000", "1e6", True),
    ("0.1", "0.1000002", False),                               # relative gap 2e-6 > 1e-6
    ("2", "3", False),
    ("-3", "3", False),
    ("12", "1,2", False),                                      # "1,2" is no thousands group: text
    ("1,000", "1", False),
    ("0.5", "0.51", False),
    ("50%", "0.5", False),                                     # percent sign is dropped, not /100
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    ("1/0", "0", False),                                       # division by zero is not a number
    ("5 cm", "5", False),                                      # no units
    ("three", "3", False),                                     # no number words
    # multiple-choice letters
    ("B", "(B)", True),
    ("B", "B.", True),
    ("B", "B)", True),
    ("B", "B) red", True),
    ("B", "B. red", True),
    ("B", "(B) red", True),
    ("b", "B", True),
    (r"\text{(B)}", "B", True),
    ("B) red", "B) blue", True),                               # the letter decides
    ("B", "C", False),
    ("B) red", "C) red", False),
    ("B", "Blue", False),                                      # a word is not option B
    ("A", "A red car", False),                                 # "A" without punctuation: article
    ("B.C.", "B", False),
    ("y", "yes", False),                                       # single letters are options
    # yes / no
    ("Yes", "yes.", True),
    ("yes", "True", True),
    ("No", "false", True),
    ("yes", "no", False),
    ("true", "false", False),
    # text
    ("red car", "  Red   car. ", True),
    (r"\text{\textbf{red}}", "red", True),
    (r"\mathrm{red}", "Red", True),
    ("red", "red car", False),
    # empty answers match nothing
    ("", "", False),
    (None, None, False),
    (None, "3", False),
    ("", "0", False),
]


@pytest.mark.parametrize("a, b, expected", EQUIV_CASES)
def test_answers_equivalent_table(a, b, expected):
    assert answers_equivalent(a, b) is expected
    assert answers_equivalent(b, a) is expected


def test_answers_equivalent_symmetric_over_all_pairs():
    answers = sorted({x for a, b, _ in EQUIV_CASES for x in (a, b)}, key=repr)
    for a, b in itertools.combinations(answers, 2):
        assert answers_equivalent(a, b) == answers_equivalent(b, a), (a, b)


@pytest.mark.parametrize("response, label, expected", [
    (r"so \boxed{\dfrac{1}{2}}", "0.5", True),
    (r"\boxed{\text{(C)}} is right", "C. blue", True),
    (r"\boxed{1{,}000}", "1000", True),                        # LaTeX thousands separator
    (r"\boxed{2} \boxed{3}", "2", False),
    (r"\boxed{}", "0", False),
])
def test_extract_then_compare(response, label, expected):
    assert answers_equivalent(extract_boxed(response), label) is expected

# -----------------------------------------------------------------------------
# majority vote and uncertainty

@pytest.mark.parametrize("answers, count_empty, expected", [
    # non-empty: B, b) red, C, (B) -> B x3 of 4; with empties: B x3 of 6
    (["B", "b) red", "C", None, "(B)", ""], False, ("B", 3 / 4)),
    (["B", "b) red", "C", None, "(B)", ""], True, ("B", 3 / 6)),
    # empties are the largest class only when counted
    ([None, "1", None, "2", None], False, ("1", 1 / 2)),
    ([None, "1", None, "2", None], True, (None, 3 / 5)),
    # ties go to the class seen first
    (["2", "1", "1", "2"], False, ("2", 1 / 2)),
    (["x", None, None, "x"], True, ("x", 1 / 2)),
    ([None, "x", None, "x"], True, (None, 1 / 2)),
    # representative = first-seen member of the class
    (["0.5", "1/2", r"\frac{1}{2}", "0.25"], False, ("0.5", 3 / 4)),
    # a blank box counts as empty
    ([r"   ", "7"], False, ("7", 1.0)),
    ([None, ""], False, (None, 0.0)),
    ([None, ""], True, (None, 0.5)),                          # the empty box still counts
    ([], False, (None, 0.0)),
    ([], True, (None, 0.0)),
])
def test_majority_vote(answers, count_empty, expected):
    label, confidence = majority_vote(answers, count_empty=count_empty)
    assert label == expected[0]
    assert confidence == pytest.approx(expected[1], abs=1e-12)


@pytest.mark.parametrize("answers, count_empty_boxes, expected", [
    # the public code's reward: an empty box is no candidate, but one of the m votes: "7" 2 of 5
    (["", "", "7", None, "7"], True, ("7", 2 / 5)),
    # its curation drops empty boxes before voting: "7" 2 of the 3 left
    (["", "", "7", None, "7"], False, ("7", 2 / 3)),
    # missing boxes ("None" to MathRuler) are a candidate: 2 of 6, or 2 of the 4 left
    (["", " ", None, "7", None, "8"], True, (None, 2 / 6)),
    (["", " ", None, "7", None, "8"], False, (None, 2 / 4)),
    # only empty boxes: no candidate at all
    (["", " "], True, (None, 0.0)),
    (["", " "], False, (None, 0.0)),
])
def test_majority_vote_counting_empty_an_empty_box_is_no_candidate(answers, count_empty_boxes, expected):
    label, confidence = majority_vote(answers, count_empty=True, count_empty_boxes=count_empty_boxes)
    assert label == expected[0]
    assert confidence == pytest.approx(expected[1], abs=1e-12)
    # not counting empty answers, both kinds are left out whatever count_empty_boxes says
    kept = [a for a in answers if a is not None and a.strip()]
    assert majority_vote(answers, False, count_empty_boxes) == majority_vote(kept)


@pytest.mark.parametrize("c, paper, code", [
    (0.5, 1.0, 0.5), (0.25, 0.5, 0.25), (0.75, 0.5, 0.25), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0),
    (0.8, 0.4, 0.2), (1 / 9, 2 / 9, 1 / 9),
])
def test_uncertainty_reward(c, paper, code):
    assert uncertainty_reward(c, "paper") == pytest.approx(paper, abs=1e-12)
    assert uncertainty_reward(c, "code") == pytest.approx(code, abs=1e-12)
    with pytest.raises(ValueError):
        uncertainty_reward(c, "other")

# -----------------------------------------------------------------------------
# BLEU

def nltk_sentence_bleu(reference, hypothesis):
    smoothing = nltk_bleu.SmoothingFunction().method1
    return nltk_bleu.sentence_bleu([reference.split()], hypothesis.split(),
                                   smoothing_function=smoothing)


def random_sentence(rng, vocab, max_len):
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, max_len)))


def test_sentence_bleu_hand_examples():
    # p_n = 4/5, 3/4, 2/3, 1/2, equal lengths: (0.8 * 0.75 * 2/3 * 0.5) ** 0.25 = 0.2 ** 0.25
    assert sentence_bleu("what color is the car", "what color is the bus") == pytest.approx(
        0.2 ** 0.25)
    # longer hypothesis: p_n = 5/6, 4/5, 3/4, 2/3 (product 1/3), no brevity penalty
    assert sentence_bleu("what color is the car", "what color is the car today") == pytest.approx(
        (1 / 3) ** 0.25)
    # shorter hypothesis: all p_n = 1, brevity penalty exp(1 - 6/5)
    assert sentence_bleu("what color is the car today", "what color is the car") == pytest.approx(
        math.exp(-0.2))
    # one token each, same token: p_1 = 1, p_2..4 = epsilon 0.1 over denominator 1
    assert sentence_bleu("a", "a") == pytest.approx(0.1 ** 0.75)
    # no shared unigram -> 0, whatever the smoothing
    assert sentence_bleu("a b c d", "e f g h") == 0.0


EDGE_PAIRS = [("", ""), ("a b", ""), ("", "a b"), ("a", "b"), ("a", "a"), ("a b c", "a b"),
              ("a b", "a b c"), ("a a a a", "a"), ("a", "a a a a"), ("a b a b a b", "b a b a"),
              ("x y z w v", "x y z w v"), ("  spaced   out  ", "spaced out")]


def test_sentence_bleu_matches_nltk():
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d"]  # tiny vocabulary: many shared n-grams and repeated tokens
    pairs = EDGE_PAIRS + [(random_sentence(rng, vocab, 10), random_sentence(rng, vocab, 10))
                          for _ in range(300)]
    for ref, hyp in pairs:
        assert abs(sentence_bleu(ref, hyp) - nltk_sentence_bleu(ref, hyp)) < 1e-9, (ref, hyp)


def test_bleu_matrix_matches_nltk_both_directions():
    rng = random.Random(1)
    texts = [random_sentence(rng, ["a", "b", "c", "d", "e"], 12) for _ in range(40)] + ["", "a"]
    bleu = bleu_matrix(texts)
    for h, r in itertools.product(range(len(texts)), repeat=2):
        assert abs(bleu[h, r] - nltk_sentence_bleu(texts[r], texts[h])) < 1e-9, (texts[r], texts[h])


def test_bleu_distance_matrix_symmetrisation():
    rng = random.Random(2)
    texts = [random_sentence(rng, ["a", "b", "c", "d"], 8) for _ in range(25)]
    sym, code = bleu_distance_matrix(texts), bleu_distance_matrix(texts, symmetric=False)
    for i, j in itertools.product(range(len(texts)), repeat=2):
        if i == j:
            assert sym[i, j] == 0.0 and code[i, j] == 0.0
            continue
        both = (nltk_sentence_bleu(texts[i], texts[j]) + nltk_sentence_bleu(texts[j], texts[i])) / 2
        assert abs(sym[i, j] - (1 - both)) < 1e-9
        # public code: hypothesis = the earlier text, reference = the later one
        lo, hi = min(i, j), max(i, j)
        assert abs(code[i, j] - (1 - nltk_sentence_bleu(texts[hi], texts[lo]))) < 1e-9

# -----------------------------------------------------------------------------
# clustering

def sklearn_partition(d, threshold):
    model = sklearn_cluster.AgglomerativeClustering(
        n_clusters=None, distance_threshold=threshold, metric="precomputed", linkage="average")
    return first_appearance(model.fit_predict(d))


def first_appearance(labels):
    names = {}
    return [names.setdefault(label, len(names)) for label in labels]


def near_duplicate_questions(rng, n):
    """n questions from a few base questions, each copied with 0-3 word edits, plus fresh ones."""
    vocab = [f"w{i}" for i in range(30)]
    bases = [[rng.choice(vocab) for _ in range(rng.randint(4, 12))]
             for _ in range(rng.randint(1, 5))]
    questions = []
    for _ in range(n):
        if rng.random() < 0.8:
            q = list(rng.choice(bases))
            for _ in range(rng.randint(0, 3)):
                q[rng.randrange(len(q))] = rng.choice(vocab)
        else:
            q = [rng.choice(vocab) for _ in range(rng.randint(0, 12))]
        questions.append(" ".join(q))
    return questions


def test_cluster_ids_hand_example():
    d = [[0, 0.2, 0.9], [0.2, 0, 0.7], [0.9, 0.7, 0]]  # {0,1} at 0.2, then (0.9 + 0.7) / 2 = 0.8
    assert cluster_ids_from_distances(d, 0.5) == [0, 0, 1]
    assert cluster_ids_from_distances(d, 0.81) == [0, 0, 0]
    assert cluster_ids_from_distances(d, 0.2) == [0, 1, 2]  # strictly below the threshold


def test_cluster_threshold_is_strict_like_sklearn():
    at = np.array([[0.0, 0.5], [0.5, 0.0]])
    below = np.array([[0.0, 0.4999], [0.4999, 0.0]])
    assert cluster_ids_from_distances(at, 0.5) == sklearn_partition(at, 0.5) == [0, 1]
    assert cluster_ids_from_distances(below, 0.5) == sklearn_partition(below, 0.5) == [0, 0]


def test_cluster_ids_small_inputs():
    assert cluster_ids([]) == []
    assert cluster_ids(["what is it"]) == [0]
    assert cluster_ids(["what is it", "what is it"]) == [0, 0]
    assert cluster_ids(["", ""]) == [0, 1]  # BLEU of empty texts is 0: distance 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_cluster_ids_match_sklearn(symmetric):
    rng = random.Random(3)
    merged, split = 0, 0
    for trial in range(60):
        questions = near_duplicate_questions(rng, rng.randint(2, 40))
        d = bleu_distance_matrix(questions, symmetric=symmetric)
        ours = cluster_ids(questions, 0.5, symmetric=symmetric)
        assert ours == sklearn_partition(d, 0.5), trial
        merged += len(set(ours)) < len(questions)
        split += len(set(ours)) > 1
    assert merged >= 40 and split >= 40  # the sets were neither all singletons nor one cluster


def symmetric_from(pairs, n):
    d = np.zeros((n, n))
    for (i, j), v in pairs.items():
        d[i, j] = d[j, i] = v
    return d


def test_cluster_ids_break_ties_like_sklearn():
    # {1, 2} and {1, 3} are both at 0.2. Closest pair first would merge {1, 2} (lowest index), then
    # {0, 3} at 0.4: [0, 1, 1, 0]. sklearn (scipy's nearest-neighbour chain 0 -> 3 -> 1 -> 3) merges
    # {1, 3}; then d(0, {1, 3}) = (1 + 0.4) / 2 = 0.7 and d(2, {1, 3}) = (0.2 + 0.8) / 2 = 0.5, both
    # at or above the threshold: [0, 1, 2, 1]
    d = symmetric_from({(0, 1): 1.0, (0, 2): 0.6, (0, 3): 0.4, (1, 2): 0.2, (1, 3): 0.2, (2, 3): 0.8}, 4)
    assert sklearn_partition(d, 0.5) == [0, 1, 2, 1]
    assert cluster_ids_from_distances(d, 0.5) == [0, 1, 2, 1]


@pytest.mark.parametrize("levels", [8, 10])
def test_cluster_ids_match_sklearn_on_tied_distances(levels):
    # distances on a grid of a few values: ties everywhere, in the input and among the averages
    # (k / 8 averages exactly in binary; k / 10 does not, so near-ties come out unequal alike)
    rng = np.random.default_rng(levels)
    differ = 0
    for trial in range(300):
        n = int(rng.integers(2, 13))
        upper = np.triu(rng.integers(1, levels + 1, size=(n, n)) / levels, k=1)
        d = upper + upper.T
        for threshold in (0.3, 0.5, 0.7):
            want = sklearn_partition(d, threshold)
            assert cluster_ids_from_distances(d, threshold) == want, (trial, threshold, d.tolist())
            differ += len(set(want)) not in (1, n)
    assert differ > 300  # most cuts were neither all singletons nor one cluster

# -----------------------------------------------------------------------------
# diversity penalty

Q_CAR, Q_BUS = "what color is the car", "what color is the bus"        # distance 1 - 0.669
Q_DOGS, Q_DOGS2 = "how many dogs are there", "how many dogs are visible"  # distance 1 - 0.669
Q_OTHER = "which animal sleeps here"                                  # shares no word with any


def test_diversity_penalty_group_and_batch():
    questions = [Q_CAR, Q_BUS, Q_DOGS, Q_OTHER, Q_DOGS, Q_DOGS2, Q_OTHER, Q_CAR]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    # group 0: {car, bus} {dogs} {other}; group 1: {dogs, dogs2} {other} {car}; n = 4
    assert diversity_penalty(questions, groups, scope="group") == pytest.approx(
        [2 / 4, 2 / 4, 1 / 4, 1 / 4, 2 / 4, 2 / 4, 1 / 4, 1 / 4])
    # batch: {car, bus, car} (distances 0, .33, .33), {dogs, dogs, dogs2}, {other, other}; n = 8
    assert diversity_penalty(questions, groups, scope="batch") == pytest.approx(
        [3 / 8, 3 / 8, 3 / 8, 2 / 8, 3 / 8, 3 / 8, 2 / 8, 3 / 8])
    assert diversity_penalty(questions, groups, scope="batch", weight=2.0) == pytest.approx(
        [6 / 8, 6 / 8, 6 / 8, 4 / 8, 6 / 8, 6 / 8, 4 / 8, 6 / 8])
    # no group ids: one group, the same as the batch
    assert diversity_penalty(questions, None, scope="group") == diversity_penalty(
        questions, groups, scope="batch")
    with pytest.raises(ValueError):
        diversity_penalty(questions, groups, scope="image")


def test_diversity_penalty_groups_need_not_be_contiguous():
    questions = [Q_CAR, Q_DOGS, Q_BUS, Q_DOGS2]
    assert diversity_penalty(questions, [7, 3, 7, 3]) == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert diversity_penalty(questions, [7, 3, 3, 7]) == pytest.approx([0.5, 0.5, 0.5, 0.5])

# -----------------------------------------------------------------------------
# questioner parsing and reward

@pytest.mark.parametrize("text, fmt, expected", [
    ("<question>How many cats?</question>", "paper", {"question": "How many cats?"}),
    ("think... <question> first </question> <question>second?</question>", "paper",
     {"question": "second?"}),
    ("<question>   </question>", "paper", None),
    ("How many cats?", "paper", None),
    ("<question>How many cats?", "paper", None),
    ("<type>numerical</type>\n<question>How many cats?</question>\n<answer>3</answer>", "code",
     {"type": "numerical", "question": "How many cats?", "answer": "3"}),
    ("<type> Multiple  Choice </type><question>Which? A) x B) y</question><answer>B</answer>",
     "code",
     {"type": "Multiple  Choice", "question": "Which? A) x B) y", "answer": "B"}),
    ("<type>numerical</type><question>How many?</question><answer> </answer>", "code", None),
    ("<type>numerical</type><question>How many?</question>", "code", None),
    ("<question>How many?</question><answer>3</answer>", "code", None),
    ("<type>regression</type><question></question><answer>3</answer>", "code", None),
])
def test_parse_question(text, fmt, expected):
    assert parse_question(text, fmt) == expected


NUMERICAL = {"type": "numerical", "question": "How many?", "answer": "3"}


@pytest.mark.parametrize("text, expected", [
    # any type is read (the prompt names three; the code's reward checks none)
    ("<type>essay</type><question>Why?</question><answer>because</answer>",
     {"type": "essay", "question": "Why?", "answer": "because"}),
    ("<type> </type><question>How many?</question><answer>3</answer>", None),  # but not an empty one
    # repeated tags: the first of each, in order
    ("<type>numerical</type><question>How many?</question><answer>3</answer>\n"
     "<type>regression</type><question>How tall?</question><answer>2.5</answer>", NUMERICAL),
    ("<type>numerical</type><question>How many?</question><question>Which?</question><answer>3</answer>",
     NUMERICAL),
    # out of order: no match
    ("<question>How many?</question><type>numerical</type><answer>3</answer>", None),
    ("<type>numerical</type><answer>3</answer><question>How many?</question>", None),
    # ... unless a later tag completes the order
    ("<answer>1</answer><type>numerical</type><question>How many?</question><answer>3</answer>", NUMERICAL),
    # white space around '<', '>' and '/' is dropped first, inside the tags and in the text alike
    ("< type >numerical</ type > < question >How many?< /question >\n<answer >3</answer >", NUMERICAL),
    ("<type>numerical</type><question>Is 3 / 4 > 1 / 2?</question><answer>1</answer>",
     {"type": "numerical", "question": "Is 3/4>1/2?", "answer": "1"}),
])
def test_parse_question_code_format_reads_like_the_public_code(text, expected):
    assert parse_question(text, "code") == expected


def test_questioner_reward():
    unc, div, valid = [1.0, 0.5, 0.2, 0.9], [0.25, 0.5, 0.5, 0.125], [True, True, True, False]
    assert questioner_reward(unc, div, valid, "paper") == pytest.approx([0.75, 0.0, 0.0, 0.0])
    assert questioner_reward(unc, div, valid, "code") == pytest.approx([0.75, 0.0, -0.3, -1.125])
    with pytest.raises(ValueError):
        questioner_reward(unc, div, valid[:3], "code")

# -----------------------------------------------------------------------------
# reasoner format and reward

@pytest.mark.parametrize("text, expected", [
    (r"<think>count them</think> \boxed{3}", True),
    ("\n<think>a</think>\\boxed{3}", True),
    (r"<think></think>\boxed{}", True),                        # format only: empty box is boxed
    (r"\boxed{3}", False),                                      # no think block
    (r"<think>a</think> so 3", False),                          # no box
    (r"<think>a \boxed{3}</think> so 3", False),                # box only inside the think block
    (r"<think>a</think> \boxed{3", False),                      # unbalanced box
    (r"intro <think>a</think> \boxed{3}", False),               # must start with <think>
])
def test_format_ok(text, expected):
    assert format_ok(text) is expected


@pytest.mark.parametrize("text, expected", [
    # only white space may stand between </think> and the box, and after the box
    (r"<think>x</think> The answer is \boxed{3}", False),
    (r"<think>x</think> \boxed{3}.", False),
    (r"<think>x</think> \boxed{3} because it is", False),
    ("<think>x</think>\n\n\\boxed{3}\n", True),
    # white space around '<', '>' and '/' does not count, as the code drops it first
    ("  < think >x< / think >\\boxed{3}", True),
    # only the end is checked: text between two boxes passes, and so do unbalanced braces
    (r"<think>x</think> \boxed{3} no, \boxed{4}", True),
    (r"<think>x</think> \boxed{{3}", True),
    # the think block may hold a </think> of its own
    (r"<think>x</think> y </think> \boxed{3}", True),
])
def test_format_ok_is_the_public_codes_check(text, expected):
    assert format_ok(text) is expected


@pytest.mark.parametrize("response, label, paper, code", [
    (r"<think>..</think> \boxed{0.5}", "1/2", 1.0, 1.0),
    (r"\boxed{0.5}", "1/2", 1.0, 0.9),                          # right but no think block
    (r"<think>..</think> \boxed{4}", "3", 0.0, 0.1),            # wrong, well formed
    (r"<think>..</think> 3", "3", 0.0, 0.0),                    # no box: no answer
    (r"<think>..</think> \boxed{B} \boxed{C}", "C) red", 1.0, 1.0),  # last box counts
    # the public code drops the spaces around '/' before it reads the answer; the paper's reward does not
    (r"<think>..</think> \boxed{km / h}", "km/h", 0.0, 1.0),
])
def test_reasoner_reward(response, label, paper, code):
    assert reasoner_reward(response, label, "paper") == pytest.approx(paper)
    assert reasoner_reward(response, label, "code") == pytest.approx(code)


def test_reasoner_reward_code_gives_no_format_point_for_words_around_the_box():
    # right answer, but words before the box: the public code scores 0.9 * 1 + 0.1 * 0
    assert reasoner_reward(r"<think>x</think> The answer is \boxed{3}", "3", "code") == pytest.approx(0.9)
    assert reasoner_reward(r"<think>x</think> \boxed{3}", "3", "code") == pytest.approx(1.0)

