"""The Reasoner role: answer a question about an image, step by step, with a final \\boxed{} answer
(METHOD.md: answers and votes, equations (2)-(4); curation, (11); the Reasoner's reward, (12)).

Four things live here:
1. `reasoner_prompt`: the instruction wrapped around a question (also the evaluation prompt).
2. `ask_and_vote`: m answers to each (image, question) pair, their majority (the silver label) and
   its share of the votes (the confidence). The Questioner's reward and curation both ask the
   frozen Reasoner this way.
3. `curate`: the vote on every question the Questioner wrote, kept iff τ_low <= c <= τ_high.
4. `rollouts`: G answers per kept question, scored against its silver label, ready for GRPO.
"""

import torch

from grpo import Rollouts
from rewards import answer_classes, extract_boxed, majority_vote, normalize_answer, reasoner_reward
from sampler import sample_in_batches

REASONER_PROMPT = ("{question}\n\nReason step by step inside <think> </think>, then give the final, "
                   "concise answer inside \\boxed{{}}.")


def reasoner_prompt(question):
    return REASONER_PROMPT.format(question=question)


def ask_and_vote(model, processors, images, questions, *, m, settings, count_empty, keys, batch_tokens,
                 count_empty_boxes=True):
    """The Reasoner answers each (image, question) pair m times; the majority answer is the silver
    label, its share of the votes the confidence c (METHOD.md, equations (2)-(4)). Both the
    Questioner's reward and curation ask the frozen Reasoner this way.

    images: list[PIL], questions: list[str], same length N -> N dicts {responses: m str, answers:
    m str | None (the last \\boxed{} of each response), silver: str | None, confidence: float}.
    One prefill per pair, its KV cache copied into the m samples (sampler.sample), as many pairs
    per sampler call as fit in a KV cache of `batch_tokens` tokens; keys: LongTensor [N], each pair's
    random stream (sampler.prompt_keys). count_empty, count_empty_boxes:
    how missing and empty boxes vote, see rewards.majority_vote.

        3 of m = 4 answers "2", one "3"  ->  silver "2", confidence 0.75
    """
    if not questions:
        return []
    prompts = processors.encode(images, [reasoner_prompt(q) for q in questions])
    out = sample_in_batches(model, prompts.to(model.device), batch_tokens, n=m, keys=keys, **vars(settings))
    texts = out.texts(processors.tokenizer)
    votes = []
    for i in range(len(questions)):
        responses = texts[i * m:(i + 1) * m]
        answers = [extract_boxed(r) for r in responses]
        silver, confidence = majority_vote(answers, count_empty, count_empty_boxes)
        votes.append({"responses": responses, "answers": answers, "silver": silver, "confidence": confidence})
    return votes


def in_band(silver, confidence, tau_low, tau_high):
    """Curation keeps a question iff it has a silver label and tau_low <= c <= tau_high (METHOD.md,
    equation (11)): when everyone agrees the question is too easy to teach anything, and when
    nobody does the silver label is likely wrong."""
    return silver is not None and tau_low <= confidence <= tau_high


def curate(model, processors, images, texts, parsed, *, m, settings, count_empty, tau_low, tau_high, keys,
           batch_tokens):
    """Curation: the frozen Reasoner votes m times on each candidate question the Questioner wrote,
    and the confidence band keeps those worth training on (METHOD.md, equation (11)).

    images: the image of each candidate; texts: the Questioner's raw outputs; parsed: their
    rewards.parse_question results (None: invalid, never asked); keys: LongTensor [len(texts)], the
    random stream of the votes on each candidate. Returns one record per candidate:
    {question, raw, valid, responses, answers, silver, confidence, kept}.
    count_empty=True is the public code's curation: a missing box votes "None", an empty box is
    dropped (rewards.majority_vote). Unlike there, a question whose majority is "None" has no
    silver label and is never kept.
    """
    asked = [j for j, p in enumerate(parsed) if p is not None]
    votes = dict(zip(asked, ask_and_vote(model, processors, [images[j] for j in asked],
                                         [parsed[j]["question"] for j in asked], m=m, settings=settings,
                                         count_empty=count_empty, keys=keys[asked], batch_tokens=batch_tokens,
                                         count_empty_boxes=False)))
    unasked = {"responses": [], "answers": [], "silver": None, "confidence": 0.0}
    records = []
    for j, (text, p) in enumerate(zip(texts, parsed)):
        vote = votes.get(j, unasked)
        records.append({"question": p["question"] if p else None, "raw": text, "valid": p is not None, **vote,
                        "kept": in_band(vote["silver"], vote["confidence"], tau_low, tau_high)})
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


def rollouts(model, processors, images, questions, silver_labels, *, G, settings, reward_mode, keys, batch_tokens):
    """G answers per (image, question, silver label) triple, each rewarded against its label
    (METHOD.md, equation (12)); as many triples per sampler call as fit in a KV cache of
    `batch_tokens` tokens; keys: LongTensor [len(questions)], each triple's random stream.

    Returns (Rollouts with B = len(questions) * G rows in group-major order, episodes: one dict per
    question {question, silver, answers: G dicts {response, answer, reward, length}}, for the logs).
    """
    prompts = processors.encode(images, [reasoner_prompt(q) for q in questions])
    out = sample_in_batches(model, prompts.to(model.device), batch_tokens, n=G, keys=keys, **vars(settings))
    texts = out.texts(processors.tokenizer)
    labels = [label for label in silver_labels for _ in range(G)]
    rewards = [reasoner_reward(t, s, mode=reward_mode) for t, s in zip(texts, labels)]
    lengths = out.mask.sum(1).tolist()
    episodes = [{"question": q, "silver": s,
                 "answers": [{"response": texts[i], "answer": extract_boxed(texts[i]), "reward": rewards[i],
                              "length": lengths[i]} for i in range(g * G, (g + 1) * G)]}
                for g, (q, s) in enumerate(zip(questions, silver_labels))]
    return (Rollouts(prompts.repeat(G), out.ids.cpu(), out.mask.cpu(), torch.tensor(rewards), group_size=G,
                     max_new_tokens=settings.max_new_tokens), episodes)
