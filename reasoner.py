"""The Reasoner role: answer a question about an image, step by step, with a final \\boxed{} answer
(METHOD.md: answers and votes, equations (2)-(4); curation, (11); the Reasoner's reward, (12)).

Four things live here:
1. `reasoner_prompt`: the instruction wrapped around a question (also the evaluation prompt).
2. `ask_and_vote`: m answers to each (image, question) pair, their majority (the silver label) and
   its share of the votes (the confidence). The Questioner's reward and curation both ask the
   frozen Reasoner this way.
3. `curate`: the vote on every question the Questioner wrote, kept iff τ_low <= c <= τ_high.
4. `rollouts`: G answers per kept question, scored against its silver label, ready for GRPO.
A Reasoner here is a sampler.Sampler (a model ready to sample); a batch of prompts is a
machinery/batch.py Batch (this process's prompts, their images and random streams).
"""

from dataclasses import dataclass, field, replace

import torch

from grpo import Rollouts
from rewards import answer_classes, extract_boxed, majority_vote, normalize_answer
from sampler import SamplingSettings

REASONER_PROMPT = ("{question}\n\nReason step by step inside <think> </think>, then give the final, "
                   "concise answer inside \\boxed{{}}.")


def reasoner_prompt(question):
    return REASONER_PROMPT.format(question=question)


@dataclass
class Vote:
    """How the frozen Reasoner votes on a question (METHOD.md, (2)-(4)): m answers sampled with
    `sampling`; count_empty, count_empty_boxes: whether answers without a box, and empty boxes,
    vote (rewards.majority_vote: the public code's reward counts both, its curation neither empty
    boxes)."""
    m: int = 10
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    count_empty: bool = True
    count_empty_boxes: bool = True


def ask_and_vote(R, images, questions, keys, vote):
    """The Reasoner R answers each (image, question) pair vote.m times; the majority answer is the
    silver label, its share of the votes the confidence c (METHOD.md, equations (2)-(4)).

    images: list[PIL], questions: list[str], keys: each pair's random stream, all of length N -> N
    dicts {responses: m str, answers: m str | None (the last \\boxed{} of each), silver: str | None,
    confidence: float}. One prefill per pair, its KV cache copied into the m samples.

        3 of m = 4 answers "2", one "3"  ->  silver "2", confidence 0.75
    """
    if not questions:
        return []
    m = vote.m
    _, _, texts = R(images, [reasoner_prompt(q) for q in questions], n=m, settings=vote.sampling, keys=keys)
    votes = []
    for i in range(len(questions)):
        responses = texts[i * m:(i + 1) * m]
        answers = [extract_boxed(r) for r in responses]
        silver, confidence = majority_vote(answers, vote.count_empty, vote.count_empty_boxes)
        votes.append({"responses": responses, "answers": answers, "silver": silver, "confidence": confidence})
    return votes


def in_band(silver, confidence, tau_low, tau_high):
    """Curation keeps a question iff it has a silver label and tau_low <= c <= tau_high (METHOD.md,
    equation (11)): when everyone agrees the question is too easy to teach anything, and when
    nobody does the silver label is likely wrong."""
    return silver is not None and tau_low <= confidence <= tau_high


def curate(R, batch, texts, parsed, *, vote, band):
    """Curation: the frozen Reasoner R votes on each candidate question the Questioner wrote about
    the batch's images (N per image, image after image), and the confidence band (τ_low, τ_high)
    keeps those worth training on (METHOD.md, equation (11)).

    texts: the Questioner's raw outputs; parsed: their rewards.parse_question results (None:
    invalid, never asked). Returns one record per candidate: {question, raw, valid, responses,
    answers, silver, confidence, kept}. An empty box never votes here, as in the public code's
    curation; with vote.count_empty, as there too, a missing box votes "None". Unlike there, a
    question whose majority is "None" has no silver label and is never kept.
    """
    N, vote = len(texts) // len(batch.items), replace(vote, count_empty_boxes=False)
    asked = [j for j, p in enumerate(parsed) if p is not None]
    images, questions = [batch.images[j // N] for j in asked], [parsed[j]["question"] for j in asked]
    votes = dict(zip(asked, ask_and_vote(R, images, questions, batch.keys("candidate votes", per=N)[asked], vote)))
    unasked = {"responses": [], "answers": [], "silver": None, "confidence": 0.0}
    records = []
    for j, (text, p) in enumerate(zip(texts, parsed)):
        v = votes.get(j, unasked)
        records.append({"question": p["question"] if p else None, "raw": text, "valid": p is not None, **v,
                        "kept": in_band(v["silver"], v["confidence"], *band)})
    return records


def random_silver_labels(records, rng):
    """The random-label control (--silver-labels random): each kept record's silver label replaced,
    in place, by one of its distinct answers drawn uniformly (distinct as the vote counts them:
    "B" and "(B)" are one answer, represented by the first seen). Uniform over the distinct
    answers, not over the m votes: a draw weighted by the votes picks the majority most often, so
    it would still be a vote in expectation."""
    for r in records:
        if r["kept"]:
            distinct = [rep for rep, _ in answer_classes([a for a in r["answers"] if a and normalize_answer(a)])]
            r["silver"] = str(rng.choice(sorted(distinct)))  # the same draw whatever the votes' order


def rollouts(R, batch, reward, *, G, settings):
    """G answers from the Reasoner R per kept question of the batch (items: records with a question
    and its silver label), each scored by reward(response, silver) (METHOD.md, equation (12)).

    Returns (Rollouts with B = len(batch.items) * G rows in group-major order, episodes: one dict
    per question {question, silver, answers: G dicts {response, answer, reward, length}, image}).
    """
    questions, labels = [r["question"] for r in batch.items], [r["silver"] for r in batch.items]
    prompts, out, texts = R(batch.images, [reasoner_prompt(q) for q in questions], n=G, settings=settings,
                            keys=batch.keys("answers"))
    rewards = [reward(t, labels[i // G]) for i, t in enumerate(texts)]
    lengths = out.mask.sum(1).tolist()
    episodes = [{"question": q, "silver": s,
                 "answers": [{"response": texts[i], "answer": extract_boxed(texts[i]), "reward": rewards[i],
                              "length": lengths[i]} for i in range(g * G, (g + 1) * G)], "image": batch.paths[g]}
                for g, (q, s) in enumerate(zip(questions, labels))]
    return (Rollouts(prompts.repeat(G), out.ids.cpu(), out.mask.cpu(), torch.tensor(rewards), group_size=G,
                     max_new_tokens=settings.max_new_tokens), episodes)
