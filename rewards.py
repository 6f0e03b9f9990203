"""
Rewards for VisPlay self-play: answer extraction and equivalence, majority votes, the Questioner's
uncertainty and diversity rewards, and the Reasoner's reward. Pure Python + numpy, no model.

METHOD.md's equations, in the order they come here: the last \\boxed{} (2), answer equivalence (3),
the silver label and confidence c (4), the uncertainty reward (5), sentence BLEU (6), the BLEU
distance (7), average-linkage clustering (8), the diversity penalty (9), the question's validity (1),
the combined Questioner reward (10) and the Reasoner's reward (12). Each point where the paper and
the public code differ is a keyword argument, paper default (METHOD.md, "Paper and public code").

What we do and what we leave out:
- Answer equivalence is a small rule set, not a math grader: normalised strings, numbers (decimals,
  fractions, thousands commas, percent), multiple-choice letters and yes/no. No symbolic algebra,
  no units ("5 cm" != "5"), no number words ("three" != "3").
- sentence BLEU equals nltk's sentence_bleu with SmoothingFunction().method1 (whitespace tokens,
  BLEU-4, one reference); the all-pairs matrix is vectorised with numpy matmuls.
- Clustering is average-linkage agglomerative clustering cut where the linkage distance reaches the
  threshold, the same partition as sklearn's AgglomerativeClustering(metric="precomputed",
  linkage="average", distance_threshold=t), tied distances included (scipy's merge order).
"""

import math
import re
from collections import Counter

import numpy as np

# -----------------------------------------------------------------------------
# answer extraction

def _closing_brace(text, open_idx):
    """Index of the '}' matching the '{' at text[open_idx], or -1 if the braces never balance.
    Every brace counts, escaped ones (\\{ \\}) too: they come in pairs in well-formed LaTeX."""
    depth = 0
    for i in range(open_idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def extract_boxed(text):
    """Content of the last \\boxed{...} in text (str), nested braces balanced; None if there is no
    box or the last one never closes (a truncated answer is no answer, we do not fall back to an
    earlier box). An empty box gives "" (see majority_vote for how it counts).
    As MathRuler's extraction, which the public code uses for every reward: only the exact
    characters "\\boxed{" open a box, so "\\boxed {4}" (a space before the brace) is no box.

    >>> extract_boxed(r"so \\boxed{2}, no wait: \\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    >>> extract_boxed(r"\\boxed{3} then \\boxed{4") is None, extract_boxed(r"\\boxed{3} then \\boxed {4}")
    (True, '3')
    """
    if text is None:
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    open_idx = start + len("\\boxed")
    close_idx = _closing_brace(text, open_idx)
    return None if close_idx < 0 else text[open_idx + 1:close_idx]

# -----------------------------------------------------------------------------
# answer equivalence

_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{")
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_UNIT_SUFFIX = re.compile(r"(?:\\?%|\^\{?\\circ\}?|°)$")  # percent and degree signs are dropped
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # "1,2" is not a number, "1,000" is
_FRAC = re.compile(rf"([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
# "b", "(b)", "b)", "b) red", "b. red", "(b) red", "b: red"; not "blue", "a red car", "b.c"
_OPTION = re.compile(r"\(([a-z])\).*|([a-z])(?:[.):](?: .*)?)?")
_BOOLEAN = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def normalize_answer(text):
    """Canonical string form of an answer (str or None -> str); "" means no answer.
    Unwraps $...$ and \\text{} / \\mathrm{} (nested too), maps \\dfrac/\\tfrac to \\frac and the
    unicode minus to '-', drops LaTeX thin spaces, reads 1{,}000 as 1,000, lowercases, collapses
    whitespace runs and drops one trailing period.

    >>> normalize_answer(r"  $\\text{ The \\textbf{Red}  Car.}$ ")
    'the red car'
    """
    if text is None:
        return ""
    s = re.sub(r"\$\s*\.$", "$", text.strip()).strip("$")  # "$5$." is "5": the full stop after the math
    while (m := _WRAPPER.search(s)):
        close_idx = _closing_brace(s, m.end() - 1)
        if close_idx < 0:
            break  # unbalanced wrapper: keep the text as written
        s = s[:m.start()] + s[m.end():close_idx] + s[close_idx + 1:]
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\[,!;:]", "", s).replace("{,}", ",").replace("\u2212", "-")
    s = " ".join(s.lower().split())
    return s[:-1].rstrip() if s.endswith(".") else s


def _to_number(s):
    """float for a normalised numeric answer ("1,000", "-.5", "1/2", "\\frac{1}{2}", "\\frac12",
    "50%"), else None. "50%" reads as 50, not 0.5."""
    s = _UNIT_SUFFIX.sub("", s).strip()
    s = re.sub(r"\s*([/{}])\s*", r"\1", re.sub(r"^([+-]) ", r"\1", s))
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if re.fullmatch(_NUM, s):
        return float(s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # LaTeX shorthand \frac12
    if (m := _FRAC.fullmatch(s)):
        sign, num, den = m.groups()
    elif (m := _SLASH.fullmatch(s)):
        sign, num, den = "", *m.groups()
    else:
        return None
    num, den = float(num), float(den)
    return None if den == 0 else (-num if sign == "-" else num) / den


def as_number(answer):
    """The number an answer (str or None) states, as answers_equivalent reads it; None if none."""
    s = normalize_answer(answer)
    return _to_number(s) if s else None


def _answer_key(text):
    """(kind, value) that decides equivalence, or None for no answer. Kinds are tried in order:
    number, option letter, yes/no, plain text; answers of different kinds never match."""
    s = normalize_answer(text)
    if not s:
        return None
    if (x := _to_number(s)) is not None:
        return ("number", x)
    if (m := _OPTION.fullmatch(s)):
        return ("option", m.group(1) or m.group(2))
    if s in _BOOLEAN:
        return ("boolean", _BOOLEAN[s])
    return ("text", s)


def answers_equivalent(a, b, rel_tol=1e-6):
    """True when two answers (str or None) mean the same. Symmetric; an empty answer matches
    nothing, not even another empty one.

    Rules: two whole numbers must be equal (1,000 = 1000.0, -3 = −3, 50% = 50; 1000001 is not
    1000000, which a relative tolerance would allow); other numbers compare with relative
    tolerance rel_tol (0.5 = 1/2 = \\frac{1}{2} = .50); a multiple-choice letter matches the same
    letter with or without its option text (B = (B) = B) = B. red, and B) red = B) blue: the letter
    decides); yes = true and no = false; anything else after normalize_answer must be equal as
    strings.
    Conservative on purpose: "A red car" is text (no punctuation after "A"), "1,2" is text (not
    twelve), "Blue" is text (not option B).

    >>> answers_equivalent(r"\\dfrac{1}{2}", ".50"), answers_equivalent("B", "(B) red")
    (True, True)
    >>> answers_equivalent("A", "A red car"), answers_equivalent("12", "1,2")
    (False, False)
    """
    ka, kb = _answer_key(a), _answer_key(b)
    if ka is None or kb is None:
        return False
    if ka[0] == kb[0] == "number":
        x, y = ka[1], kb[1]
        if x.is_integer() and y.is_integer():
            return x == y
        return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-12)
    return ka == kb

# -----------------------------------------------------------------------------
# majority vote and the uncertainty reward

def answer_classes(answers):
    """[representative, count] of each class of equivalent answers (list[str | None]), in order of
    first occurrence: an answer joins the first class whose representative (its first-seen answer)
    is equivalent to it; the missing boxes (None) form one class of their own."""
    classes = []
    for answer in answers:
        for cls in classes:
            same = cls[0] is None if answer is None else answers_equivalent(cls[0], answer)
            if same:
                cls[1] += 1
                break
        else:
            classes.append([answer, 1])
    return classes


def majority_vote(answers, count_empty=False, count_empty_boxes=True):
    """Silver label and confidence of m answers (list[str | None], extracted boxes: None = no box,
    "" or blank = an empty box).

    Answers join the first class whose representative (its first-seen answer) is equivalent to
    them; the largest class wins, ties go to the class seen first. Returns (representative,
    confidence). Neither a missing nor an empty box is ever a label:
    - count_empty=False (paper): c = count(majority) / count(non-empty answers);
      all empty -> (None, 0.0).
    - count_empty=True (public code, reward and curation: MathRuler reads a missing box as the
      answer "None"): the missing boxes form one more class, which wins with label None and c its
      share. An empty box is no candidate; count_empty_boxes says whether it still counts among
      the votes: True in the code's questioner reward (c is out of all m), False in its curation
      (which drops empty boxes before voting).

    >>> majority_vote(["B", "b) red", "C", None, "(B)", ""])
    ('B', 0.75)
    >>> majority_vote(["B", "b) red", "C", None, "(B)", ""], count_empty=True)
    ('B', 0.5)
    >>> votes = ["", "", "7", None, "7"]
    >>> majority_vote(votes, count_empty=True), majority_vote(votes, True, count_empty_boxes=False)
    (('7', 0.4), ('7', 0.6666666666666666))
    """
    votes, n_votes = [], 0
    for answer in answers:
        if answer is not None and not normalize_answer(answer):  # an empty box: never a candidate
            if count_empty and count_empty_boxes:
                n_votes += 1
            continue
        if answer is None and not count_empty:
            continue
        n_votes += 1
        votes.append(answer)
    classes = answer_classes(votes)
    if not classes:
        return None, 0.0
    label, count = max(classes, key=lambda cls: cls[1])  # max keeps the first of equal counts
    return label, count / n_votes


def uncertainty_reward(c, scale="paper"):
    """Questioner difficulty reward from the Reasoner's confidence c in [0, 1] (float).
    paper: 1 - |2c - 1| (1 at c = 0.5, 0 at c in {0, 1}); code: min(c, 1 - c), half that scale;
    none: 1 whatever c, the ablation that takes difficulty away (a valid question is all that pays)."""
    if scale == "none":
        return 1.0
    if scale == "paper":
        return 1.0 - abs(2.0 * c - 1.0)
    if scale == "code":
        return min(c, 1.0 - c)
    raise ValueError(f"unknown scale {scale!r}")

# -----------------------------------------------------------------------------
# BLEU, BLEU distances and clustering

_BLEU_ORDER = 4
_BLEU_EPSILON = 0.1  # nltk SmoothingFunction().method1: epsilon added to zero-match numerators


def _bleu_from_matches(matches, hyp_len, ref_len):
    """BLEU-4 from clipped n-gram matches, exactly as nltk's sentence_bleu with method1.
    matches: array [4, ...] (n = 1..4); hyp_len, ref_len: token counts broadcastable to [...].
    p_n = matches_n / max(1, hyp n-grams), a zero numerator becomes epsilon; no unigram match
    means BLEU 0; brevity penalty exp(1 - ref_len / hyp_len) when hyp_len <= ref_len."""
    log_p = 0.0
    for n in range(1, _BLEU_ORDER + 1):
        denominator = np.maximum(hyp_len - n + 1, 1)
        numerator = np.where(matches[n - 1] > 0, matches[n - 1], _BLEU_EPSILON)
        log_p = log_p + np.log(numerator / denominator) / _BLEU_ORDER
    # hyp_len == 0 has no unigram match and scores 0 below: the max only avoids dividing by 0
    brevity = np.where(hyp_len > ref_len, 1.0, np.exp(1.0 - ref_len / np.maximum(hyp_len, 1)))
    return np.where(matches[0] > 0, brevity * np.exp(log_p), 0.0)


def _ngrams(tokens, n):
    return zip(*(tokens[k:] for k in range(n)))


def sentence_bleu(reference, hypothesis):
    """Sentence BLEU-4 of hypothesis against one reference (both str, split on whitespace), equal
    to nltk.translate.bleu_score.sentence_bleu([reference.split()], hypothesis.split(),
    smoothing_function=SmoothingFunction().method1). Not symmetric.

    Worked example, ref "what color is the car", hyp "what color is the bus": matches 4/5, 3/4,
    2/3, 1/2 for n = 1..4, equal lengths so no brevity penalty, BLEU = (0.2)^(1/4) = 0.669.
    ref "what color is the car", hyp "what color is the car today": (1/3)^(1/4) = 0.760; swapped,
    all precisions are 1 but the hypothesis is short: exp(1 - 6/5) = 0.819.
    """
    ref, hyp = reference.split(), hypothesis.split()
    matches = []
    for n in range(1, _BLEU_ORDER + 1):
        hyp_counts, ref_counts = Counter(_ngrams(hyp, n)), Counter(_ngrams(ref, n))
        matches.append(sum(min(c, ref_counts[g]) for g, c in hyp_counts.items()))
    return float(_bleu_from_matches(np.array(matches), len(hyp), len(ref)))


def _occurrence_matrix(token_lists, n):
    """Binary matrix [num_texts, num_columns] with one column per (n-gram, k) = "the k-th occurrence
    of this n-gram". A text with count c of an n-gram has its first c columns set, so for texts h, r
    (x @ x.T)[h, r] = sum over n-grams of min(count_h, count_r): BLEU's clipped matches, all pairs
    in one matmul. E.g. "a a b" -> columns (a,1), (a,2), (b,1); "a b b" -> (a,1), (b,1), (b,2);
    shared columns (a,1), (b,1): 2 clipped unigram matches."""
    columns, rows, cols = {}, [], []
    for row, tokens in enumerate(token_lists):
        seen = Counter()
        for gram in _ngrams(tokens, n):
            seen[gram] += 1
            rows.append(row)
            cols.append(columns.setdefault((gram, seen[gram]), len(columns)))
    x = np.zeros((len(token_lists), len(columns)), dtype=np.float32)  # counts < 2^24: exact
    x[rows, cols] = 1.0
    return x


def bleu_matrix(texts):
    """All-pairs sentence BLEU of texts (list[str], n of them) -> float64 [n, n] with
    B[h, r] = sentence_bleu(reference=texts[r], hypothesis=texts[h]). The clipped matches are
    symmetric; only the precision denominators (hypothesis length) and the brevity penalty are
    not."""
    token_lists = [t.split() for t in texts]
    lengths = np.array([len(t) for t in token_lists], dtype=np.float64)
    matches = np.stack([(x @ x.T).astype(np.float64)
                        for x in (_occurrence_matrix(token_lists, n)
                                  for n in range(1, _BLEU_ORDER + 1))])
    return _bleu_from_matches(matches, lengths[:, None], lengths[None, :])


def bleu_distance_matrix(texts, symmetric=True):
    """BLEU distances d = 1 - BLEU of texts (list[str], n of them) -> float64 [n, n], symmetric,
    zero diagonal (a text is its own duplicate; nltk's BLEU of a short text with itself is < 1
    because of smoothing, and clustering never reads the diagonal).

    BLEU is not symmetric but average linkage needs one distance per pair:
    - symmetric=True (ours): d(i, j) = 1 - (BLEU(ref=i, hyp=j) + BLEU(ref=j, hyp=i)) / 2, so the
      order of the questions in the batch does not matter.
    - symmetric=False (public code): for i < j, d(i, j) = d(j, i) = 1 - BLEU(ref=j, hyp=i).
    E.g. "what color is the car" vs "what color is the car today": 1 - (0.760 + 0.819) / 2 = 0.211.
    """
    bleu = bleu_matrix(texts)
    if symmetric:
        d = 1.0 - (bleu + bleu.T) / 2.0
    else:
        upper = np.triu(1.0 - bleu, k=1)
        d = upper + upper.T
    np.fill_diagonal(d, 0.0)
    return d


def cluster_ids_from_distances(d, threshold=0.5):
    """Average-linkage agglomerative clustering of a distance matrix d [n, n] (its upper triangle is
    read), cut where the merge distance reaches threshold: list[int] of n cluster ids numbered by
    first appearance. The same partition as sklearn's AgglomerativeClustering(metric="precomputed",
    linkage="average", distance_threshold=threshold), ties included: sklearn builds the whole tree
    with scipy's nearest-neighbour chain and keeps the merges below the threshold, so we do too.

    The chain starts at the lowest active cluster and steps to its nearest neighbour (the lowest
    index among equals, the previous cluster of the chain when it is one of them) until two are
    each other's nearest; those merge, the merged cluster takes the higher index, and its distance
    to k is (n_i d(k, i) + n_j d(k, j)) / (n_i + n_j), the average pairwise distance.
    E.g. d = [[0, .2, .9], [.2, 0, .7], [.9, .7, 0]]: merge {0, 1} at 0.2, then
    d({0, 1}, 2) = 0.8 >= 0.5 -> [0, 0, 1]. Ties are where the order matters: d01 = 1, d02 = .6,
    d03 = .4, d12 = d13 = .2, d23 = .8 merges {1, 3} at .2 (the chain 0 -> 3 -> 1 -> 3); 0 and 2
    are then at .7 and .5 from it: [0, 1, 2, 1], where the closest pair first would merge {1, 2},
    then {0, 3}: [0, 1, 1, 0].
    """
    upper = np.triu(np.array(d, dtype=np.float64), k=1)
    d = upper + upper.T
    n = len(d)
    np.fill_diagonal(d, np.inf)  # a merged-away cluster's row and column become inf too
    size = np.ones(n)
    owner = np.arange(n)  # each point's cluster, by the index that holds it
    chain = []
    for _ in range(n - 1):
        if not chain:
            chain.append(int(np.argmax(size > 0)))
        while True:
            x = chain[-1]
            y = int(np.argmin(d[x]))  # the first of equal minima
            if len(chain) > 1 and d[x, chain[-2]] <= d[x, y]:
                y = chain.pop(-2)  # mutual nearest neighbours
                break
            chain.append(y)
        chain.pop()
        i, j = min(x, y), max(x, y)
        merged = (size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])
        # a merge at or above the threshold is cut off; none below it builds on it, as an average
        # linkage cluster is no closer to anything than its two parts were to each other
        if d[i, j] < threshold:
            owner[owner == i] = j
        d[j, :], d[:, j] = merged, merged
        d[i, :], d[:, i], d[j, j] = np.inf, np.inf, np.inf
        size[j] += size[i]
        size[i] = 0
    first_seen = {}
    return [first_seen.setdefault(o, len(first_seen)) for o in owner.tolist()]


def cluster_ids(texts, threshold=0.5, symmetric=True):
    """Cluster ids (list[int], one per text, numbered by first appearance) of texts (list[str])
    under BLEU distance, average linkage, cut at threshold. See bleu_distance_matrix."""
    if not texts:
        return []
    return cluster_ids_from_distances(bleu_distance_matrix(texts, symmetric), threshold)


def diversity_penalty(questions, group_ids=None, scope="group", weight=1.0, threshold=0.5,
                      symmetric=True):
    """Repetition penalty r_div = weight * |C(x_i)| / n per question (list[str]) -> list[float].
    scope="group" (paper): cluster within each image's group (group_ids: list[int], one per
    question; None = one group), n = that group's size. scope="batch" (code): cluster the whole
    batch, n = batch size, group_ids ignored.

    E.g. one group ["what color is the car", "what color is the bus", "how many dogs are there",
    "which animal sleeps here"]: the first two are at distance 1 - 0.669 < 0.5, the rest share no
    word -> clusters of size 2, 2, 1, 1 -> [0.5, 0.5, 0.25, 0.25].
    """
    if scope not in ("group", "batch"):
        raise ValueError(f"unknown scope {scope!r}")
    if scope == "batch" or group_ids is None:
        groups = [list(range(len(questions)))]
    else:
        groups = {}
        for i, g in enumerate(group_ids):
            groups.setdefault(g, []).append(i)
        groups = list(groups.values())
    penalty = [0.0] * len(questions)
    for members in groups:
        ids = cluster_ids([questions[i] for i in members], threshold, symmetric)
        sizes = Counter(ids)
        for i, c in zip(members, ids):
            penalty[i] = weight * sizes[c] / len(members)
    return penalty

# -----------------------------------------------------------------------------
# questioner: parsing, validity, combined reward

def _last_tag(text, tag):
    """Stripped content of the last <tag>...</tag> in text, or None."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return found[-1].strip() if found else None


# The public code drops white space around '<', '>' and '/' from every output before reading it
# (for models that write "< question >"), the Questioner's and the Reasoner's alike.
_TAG_SPACE = re.compile(r"\s*([<>/])\s*")
# code format: the first <type>, then the first <question> after it, then the first <answer> after
# that, anything in between
_CODE_QUESTION = re.compile(".*?".join(rf"<{tag}>(.*?)</{tag}>" for tag in ("type", "question", "answer")),
                            re.DOTALL)


def parse_question(text, fmt="paper"):
    """Parse a Questioner output (str) -> dict, or None when it is invalid.
    paper: {"question"} from a non-empty <question>...</question>; with several, the last one
    counts, like the last \\boxed{}.
    code: {"type", "question", "answer"} as the public code reads them: white space around '<',
    '>' and '/' is dropped from the whole output first (so "< question >" is a tag, and "3 / 4"
    in a question becomes "3/4"), then the first <type>, <question>, <answer> in that order
    count; all three stripped and non-empty, the type any text (the prompt asks for one of
    multiple choice, numerical, regression; the code checks none). Tags out of order: invalid.
    (The code still clusters the question of an output whose answer is empty; here it is invalid
    like any other, see diversity_texts in questioner.py.)

    >>> parse_question("<type>Numerical</type><question>How many?</question><answer>3</answer>",
    ...                "code")
    {'type': 'Numerical', 'question': 'How many?', 'answer': '3'}
    """
    if fmt == "paper":
        question = _last_tag(text, "question")
        return {"question": question} if question else None
    if fmt != "code":
        raise ValueError(f"unknown fmt {fmt!r}")
    m = _CODE_QUESTION.search(_TAG_SPACE.sub(r"\1", text))
    parts = [part.strip() for part in m.groups()] if m else [""]
    return dict(zip(("type", "question", "answer"), parts)) if all(parts) else None


def questioner_reward(uncertainty, diversity, valid, combine="paper"):
    """Combined Questioner reward per question; uncertainty, diversity: list[float], valid:
    list[bool], same length -> list[float].
    paper: valid * max(0, r_unc - r_div); code: r_unc - r_div if valid else -1 - r_div.
    E.g. r_unc 0.5, r_div 0.75: paper 0.0, code -0.25; invalid with r_div 0.25: paper 0, code -1.25.
    """
    if combine not in ("paper", "code"):
        raise ValueError(f"unknown combine {combine!r}")
    rewards = []
    for u, d, ok in zip(uncertainty, diversity, valid, strict=True):
        if combine == "paper":
            rewards.append(max(0.0, u - d) if ok else 0.0)
        else:
            rewards.append(u - d if ok else -1.0 - d)
    return rewards

# -----------------------------------------------------------------------------
# reasoner reward

# the public code's reasoner format, after _TAG_SPACE: the whole response is a think block and a
# box with only white space between and after
_REASONER_FORMAT = re.compile(r"<think>.*</think>\s*\\boxed\{.*\}\s*", re.DOTALL)


def format_ok(text):
    """True when text (str) has the public code's reasoner format: <think>...</think>, white space,
    \\boxed{...}, white space, nothing else (its regex, matched against the whole response).
    As there, white space around '<', '>' and '/' is dropped first, so a leading newline or
    "< /think >" is fine; a box inside the think block does not count; the box's braces are not
    checked for balance, only that the response ends with "}".

    >>> format_ok(r"< think >x</think> \\boxed{3} "), format_ok(r"<think>x</think> So: \\boxed{3}")
    (True, False)
    """
    return _REASONER_FORMAT.fullmatch(_TAG_SPACE.sub(r"\1", text)) is not None


def reasoner_reward(response_text, silver_label, mode="paper"):
    """Reasoner reward of one response (str) against the silver label (str) -> float.
    paper: 1.0 if the last \\boxed{} is equivalent to the label, else 0.0.
    code: 0.9 * accuracy + 0.1 * format_ok, both read as the public code reads a response, with the
    white space around '<', '>' and '/' dropped first (so "\\boxed{km / h}" is right for "km/h").
    E.g. "<think>..</think> \\boxed{0.5}" vs "1/2": 1.0 in both modes; "\\boxed{0.5}" alone: paper
    1.0, code 0.9."""
    if mode not in ("paper", "code"):
        raise ValueError(f"unknown mode {mode!r}")
    text = response_text if mode == "paper" else _TAG_SPACE.sub(r"\1", response_text)
    accuracy = float(answers_equivalent(extract_boxed(text), silver_label))
    return accuracy if mode == "paper" else 0.9 * accuracy + 0.1 * float(format_ok(text))
