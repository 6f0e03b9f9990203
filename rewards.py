"""
Rewards for VisPlay self-play: answer extraction and equivalence, majority votes, the Questioner's
uncertainty and diversity rewards, and the Reasoner's reward. Pure Python + numpy, no model.

Spec sections: "Questioner" (validity, r_unc, BLEU clustering r_div, the
combined reward), "Reasoner" (last \\boxed{}, answer equivalence, accuracy/format reward) and
"Where paper and code differ" (items 1-4, 6, 7: each is a keyword argument here, paper default).

What we do and what we leave out:
- Answer equivalence is a small rule set, not a math grader: normalised strings, numbers (decimals,
  fractions, thousands commas, percent), multiple-choice letters and yes/no. No symbolic algebra,
  no units ("5 cm" != "5"), no number words ("three" != "3").
- sentence BLEU equals nltk's sentence_bleu with SmoothingFunction().method1 (whitespace tokens,
  BLEU-4, one reference); the all-pairs matrix is vectorised with numpy matmuls.
- Clustering is average-linkage agglomerative clustering cut where the linkage distance reaches the
  threshold, the same partition as sklearn's AgglomerativeClustering(metric="precomputed",
  linkage="average", distance_threshold=t).
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
    earlier box). An empty box gives "" (majority_vote treats "" as no answer).

    >>> extract_boxed(r"so \\boxed{2}, no wait: \\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    >>> extract_boxed(r"\\boxed{3} then \\boxed{4") is None
    True
    """
    if text is None:
        return None
    starts = list(re.finditer(r"\\boxed\s*\{", text))
    if not starts:
        return None
    open_idx = starts[-1].end() - 1
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

def majority_vote(answers, count_empty=False):
    """Silver label and confidence of m answers (list[str | None], extracted boxes).

    Answers join the first class whose representative (its first-seen answer) is equivalent to
    them; the largest class wins, ties go to the class seen first. Returns (representative,
    confidence). Empty answers (None or "") are never a label:
    - count_empty=False (spec's curation): c = count(majority) / count(non-empty answers);
      all empty -> (None, 0.0).
    - count_empty=True (code's questioner reward, where a missing box is a vote for "None"):
      the empty answers form one more class and c = count(majority) / len(answers); when that
      class wins the label is None and c is its share.

    >>> majority_vote(["B", "b) red", "C", None, "(B)", ""])
    ('B', 0.75)
    >>> majority_vote(["B", "b) red", "C", None, "(B)", ""], count_empty=True)
    ('B', 0.5)
    """
    classes = []  # [representative, count], in order of first occurrence; None = the empty class
    n_votes = 0
    for answer in answers:
        if not normalize_answer(answer):
            if not count_empty:
                continue
            answer = None
        n_votes += 1
        for cls in classes:
            same = cls[0] is None if answer is None else answers_equivalent(cls[0], answer)
            if same:
                cls[1] += 1
                break
        else:
            classes.append([answer, 1])
    if not classes:
        return None, 0.0
    label, count = max(classes, key=lambda cls: cls[1])  # max keeps the first of equal counts
    return label, count / n_votes


def uncertainty_reward(c, scale="paper"):
    """Questioner difficulty reward from the Reasoner's confidence c in [0, 1] (float).
    paper: 1 - |2c - 1| (1 at c = 0.5, 0 at c in {0, 1}); code: min(c, 1 - c), half that scale."""
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
    """Average-linkage agglomerative clustering of a symmetric distance matrix d [n, n]: merge the
    two closest clusters while their average pairwise distance is strictly below threshold (sklearn
    stops at distance >= distance_threshold). Returns list[int] of n cluster ids numbered by first
    appearance. Equal distances merge the pair with the lowest (row, col) first.

    Lance-Williams update: d(k, i+j) = (n_i d(k, i) + n_j d(k, j)) / (n_i + n_j) is the average
    pairwise distance, O(n^2) per merge. E.g. d = [[0, .2, .9], [.2, 0, .7], [.9, .7, 0]]:
    merge {0, 1} at 0.2, then d({0, 1}, 2) = 0.8 >= 0.5 stops -> [0, 0, 1].
    """
    d = np.array(d, dtype=np.float64)
    n = len(d)
    np.fill_diagonal(d, np.inf)
    size = np.ones(n)
    owner = np.arange(n)  # each point's cluster, named by the smallest index in it
    while n > 1:
        i, j = divmod(int(np.argmin(d)), n)  # i < j: the first minimum of a symmetric matrix
        if not d[i, j] < threshold:
            break
        merged = (size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])
        d[i, :], d[:, i] = merged, merged
        d[j, :], d[:, j], d[i, i] = np.inf, np.inf, np.inf
        size[i] += size[j]
        owner[owner == j] = i
    return np.unique(owner, return_inverse=True)[1].tolist()


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

QUESTION_TYPES = ("multiple choice", "numerical", "regression")


def _last_tag(text, tag):
    """Stripped content of the last <tag>...</tag> in text, or None."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return found[-1].strip() if found else None


def parse_question(text, fmt="paper"):
    """Parse a Questioner output (str) -> dict, or None when it is invalid.
    paper: {"question"} from a non-empty <question>...</question>.
    code: {"type", "question", "answer"} from <type>T</type> <question>Q</question>
    <answer>A</answer>, all non-empty, T in QUESTION_TYPES (case and spacing ignored).
    With several tags of a kind the last one counts, like the last \\boxed{} and the public code.

    >>> parse_question("<type>Numerical</type><question>How many?</question><answer>3</answer>",
    ...                "code")
    {'type': 'numerical', 'question': 'How many?', 'answer': '3'}
    """
    question = _last_tag(text, "question")
    if not question:
        return None
    if fmt == "paper":
        return {"question": question}
    if fmt != "code":
        raise ValueError(f"unknown fmt {fmt!r}")
    qtype, answer = _last_tag(text, "type"), _last_tag(text, "answer")
    qtype = " ".join(qtype.lower().split()) if qtype else None
    if qtype not in QUESTION_TYPES or not answer:
        return None
    return {"type": qtype, "question": question, "answer": answer}


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

def format_ok(text):
    """True when text (str) is <think>...</think> followed by a balanced \\boxed{}: the code's
    reasoner format, its regex "<think>.*</think>.*\\\\boxed\\{.*\\}.*". Text after the box is
    allowed as there; leading whitespace too (the regex would refuse it). A box inside the think
    block does not count."""
    m = re.fullmatch(r"\s*<think>.*?</think>(.*)", text, re.DOTALL)
    return m is not None and extract_boxed(m.group(1)) is not None


def reasoner_reward(response_text, silver_label, mode="paper"):
    """Reasoner reward of one response (str) against the silver label (str) -> float.
    paper: 1.0 if the last \\boxed{} is equivalent to the label, else 0.0.
    code: 0.9 * accuracy + 0.1 * format_ok.
    E.g. "<think>..</think> \\boxed{0.5}" vs "1/2": 1.0 in both modes; "\\boxed{0.5}" alone: paper
    1.0, code 0.9."""
    accuracy = float(answers_equivalent(extract_boxed(response_text), silver_label))
    if mode == "paper":
        return accuracy
    if mode == "code":
        return 0.9 * accuracy + 0.1 * float(format_ok(response_text))
    raise ValueError(f"unknown mode {mode!r}")
