"""The Questioner role: look at an image and write one hard but answerable question about it
(METHOD.md, equation (1); its reward, equations (4)-(10)).

Its reward needs a second model: the frozen Reasoner of the previous iteration answers every valid
question m times (`reasoner.ask_and_vote`, one prefill per question): the reward is a function of
the Reasoner, `functools.partial(score_questions, R, reward=...)`, handed to `rollouts`. A question is worth asking when
those answers disagree (uncertainty, largest at confidence 0.5) and when it does not repeat the
other questions (the diversity penalty, BLEU clusters). Invalid outputs (no parsable question) get
the invalid-output reward of equation (10): 0 in the paper's form, -1 - r_div in the public code's.

Two question formats, the paper's and the public code's (equation (1)): "paper" asks for
<question>…</question> only; "code" asks for <type>/<question>/<answer> with one worked example
(the public code's prompt, in our words).
"""

from dataclasses import dataclass, field

import torch

from grpo import Rollouts
from reasoner import Vote, ask_and_vote
from rewards import diversity_penalty, parse_question, questioner_reward, uncertainty_reward

QUESTIONER_PROMPTS = {
    "paper": (
        "Look carefully at this image. Write exactly one question about it that needs analysis or "
        "reasoning about what the image shows, not just naming an object, and that has one short, "
        "definite final answer (a number, a word, or an option letter). Put the question inside "
        "<question></question> and write nothing else."
    ),
    "code": (
        "Look carefully at this image and write exactly one challenging question about it that needs "
        "reasoning over what the image shows. The question must have one short, definite answer.\n"
        "First give the question type, one of: multiple choice, numerical, regression. For a multiple "
        "choice question list the options as A, B, C, D inside the question; numerical and regression "
        "answers are plain numbers without units.\n"
        "Answer in exactly this format:\n"
        "<type>TYPE</type> <question>QUESTION</question> <answer>ANSWER</answer>\n"
        "Example:\n"
        "<type>numerical</type> <question>How many chairs are fewer than the people seated at the "
        "table?</question> <answer>2</answer>"
    ),
}


@dataclass
class QuestionerRewardSettings:
    """The switches of the Questioner's reward, METHOD.md equations (4)-(10) (paper defaults)."""
    vote: Vote = field(default_factory=Vote)  # how the frozen Reasoner answers each question (m, ...)
    uncertainty_scale: str = "paper"  # 1 - |2c - 1|, or "code": min(c, 1 - c), or "none": 1 (ablation)
    diversity_scope: str = "group"    # cluster within an image's G questions, or "batch"
    diversity_weight: float = 1.0     # λ
    diversity_threshold: float = 0.5  # BLEU distance at which clustering stops
    combine: str = "paper"            # valid · max(0, r_unc − r_div), or "code": r_unc − r_div / −1 − r_div
    diversity_bleu: str = "symmetric"  # BLEU distance, both directions averaged, or "one-sided" (code)
    diversity_invalid: str = "raw"    # an invalid output is clustered as its text, or "empty" (code)


def write_questions(Q, images, keys, *, n, settings, fmt):
    """n questions per image from the Questioner Q (a sampler.Sampler); keys: each image's random
    stream. Returns (prompts: PromptBatch of the images, samples: Samples of len(images) * n rows
    in image-major order, texts: list of str, parsed: list of dict | None, rewards.parse_question)."""
    prompts, out, texts = Q(images, [QUESTIONER_PROMPTS[fmt]] * len(images), n=n, settings=settings, keys=keys)
    return prompts, out, texts, [parse_question(t, fmt) for t in texts]


def diversity_texts(parsed, texts, invalid="raw"):
    """What each output is clustered as by the diversity penalty -> list[str]. parsed:
    parse_question results (None = invalid), texts: the raw outputs, both of one length.
    A valid output is its question. The paper does not say what an invalid one is; "raw" (our
    default) clusters its raw text, so a malformed output that repeats a question still counts as
    a repeat of it; "empty" (public code) clusters "", whose BLEU with anything is 0: a cluster of
    its own. (The code's "" also stands for an output with no tags at all, while one whose answer
    tag is empty keeps its question; here both are invalid and both are "".)

    >>> diversity_texts([{"question": "How many?"}, None], ["<question>How many?</question>", "How many?"],
    ...                 "empty")
    ['How many?', '']
    """
    if invalid not in ("raw", "empty"):
        raise ValueError(f"unknown invalid {invalid!r}")
    return [p["question"] if p else (t if invalid == "raw" else "") for p, t in zip(parsed, texts, strict=True)]


def score_questions(R, batch, parsed, texts, *, reward):
    """The Questioner's reward for each of its outputs on a batch of images (METHOD.md, (4)-(10)),
    the frozen Reasoner R (a sampler.Sampler) answering each valid question `reward.vote.m` times.

    batch: the images asked about (machinery/batch.py), G outputs each, image after image; parsed:
    parse_question of each output (None = invalid); texts: the raw outputs. Returns (rewards:
    list[float], episodes: one dict per output with the Reasoner's answers and the reward's parts).
    """
    G = len(texts) // len(batch.items)
    groups = [i // G for i in range(len(texts))]  # the image of each output
    valid = [p is not None for p in parsed]
    asked = [i for i, ok in enumerate(valid) if ok]
    votes = ask_and_vote(R, [batch.images[groups[i]] for i in asked], [parsed[i]["question"] for i in asked],
                         batch.keys("votes", per=G)[asked], reward.vote)
    episodes = [{"raw": t, "question": p["question"] if p else None, "valid": ok, "answers": [], "silver": None,
                 "confidence": 0.0, "uncertainty": 0.0} for p, t, ok in zip(parsed, texts, valid)]
    for i, vote in zip(asked, votes):  # the answers, not the whole responses: the log stays readable
        episodes[i].update(answers=vote["answers"], silver=vote["silver"], confidence=vote["confidence"],
                           uncertainty=uncertainty_reward(vote["confidence"], reward.uncertainty_scale))

    def penalty(questions):  # an image's G questions are all here; the batch's may not be
        return diversity_penalty(questions, groups, scope=reward.diversity_scope, weight=reward.diversity_weight,
                                 threshold=reward.diversity_threshold,
                                 symmetric={"symmetric": True, "one-sided": False}[reward.diversity_bleu])
    questions = diversity_texts(parsed, texts, reward.diversity_invalid)
    diversity = penalty(questions) if reward.diversity_scope == "group" else batch.over_batch(penalty, questions, G)
    rewards = questioner_reward([e["uncertainty"] for e in episodes], diversity, valid, combine=reward.combine)
    for e, g, div, r in zip(episodes, groups, diversity, rewards):
        e.update(diversity=div, reward=r, image=batch.paths[g])
    return rewards, episodes


def rollouts(Q, batch, reward, *, G, settings, fmt):
    """G questions per image of the batch from the Questioner Q, each rewarded by
    `reward(batch, parsed, texts) -> (rewards, episodes)` (`score_questions` with its Reasoner).
    Returns (Rollouts of len(batch.items) * G rows, the episodes)."""
    prompts, out, texts, parsed = write_questions(Q, batch.images, batch.keys("questions"), n=G, settings=settings,
                                                  fmt=fmt)
    rewards, episodes = reward(batch, parsed, texts)
    return Rollouts(prompts.repeat(G), out.ids.cpu(), out.mask.cpu(), torch.tensor(rewards), group_size=G,
                    max_new_tokens=settings.max_new_tokens), episodes
