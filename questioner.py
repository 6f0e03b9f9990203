"""The Questioner role: look at an image and write one hard but answerable question about it
(spec: "Questioner").

Its reward needs a second model: the frozen Reasoner of the previous iteration answers every valid
question m times (`reasoner.answer`, one prefill per question). A question is worth asking when
those answers disagree (uncertainty, largest at confidence 0.5) and when it does not repeat the
other questions (the diversity penalty, BLEU clusters). Invalid outputs (no parsable question) get
the spec's invalid-output reward.

Two question formats, both in the spec: "paper" asks for <question>…</question> only; "code" asks
for <type>/<question>/<answer> with one worked example (the public code's prompt, in our words).
"""

from dataclasses import dataclass

import torch

import reasoner
from grpo import Rollouts
from model import encode_prompts
from rewards import diversity_penalty, majority_vote, parse_question, questioner_reward, uncertainty_reward
from sampler import sample_in_batches

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
    """The spec's paper-vs-code switches that shape the Questioner's reward (paper defaults)."""
    m: int = 10                      # Reasoner answers per question
    uncertainty_scale: str = "paper"  # 1 - |2c - 1|, or "code": min(c, 1 - c)
    diversity_scope: str = "group"    # cluster within an image's G questions, or "batch"
    diversity_weight: float = 1.0     # λ
    diversity_threshold: float = 0.5  # BLEU distance at which clustering stops
    combine: str = "paper"            # valid · max(0, r_unc − r_div), or "code": r_unc − r_div / −1 − r_div
    count_empty: bool = True          # answers without \boxed{} vote for "None" (public code's reward)


def write_questions(model, tokenizer, image_processor, images, n, settings, generator, batch_tokens, fmt="paper"):
    """n questions per image, as many images per sampler call as fit in a KV cache of `batch_tokens`
    tokens. Returns (prompts: PromptBatch of the images, samples: Samples with len(images) * n rows
    in image-major order, texts: list of str, parsed: list of dict | None)."""
    prompts = encode_prompts(tokenizer, image_processor, images, [QUESTIONER_PROMPTS[fmt]] * len(images))
    out = sample_in_batches(model, prompts.to(model.device), batch_tokens, n=n, generator=generator, **vars(settings))
    texts = out.texts(tokenizer)
    return prompts, out, texts, [parse_question(t, fmt) for t in texts]


def score_questions(reasoner_model, tokenizer, image_processor, question_images, parsed, texts, group_ids,
                    reward, answer_settings, generator, batch_tokens):
    """The Questioner's reward for each output.

    question_images: the image of each output; parsed: parse_question results (None = invalid);
    texts: the raw outputs (the diversity penalty compares those of invalid outputs too);
    group_ids: the image group of each output. Returns (rewards: list[float], details: list of
    dicts with the Reasoner's answers and the reward's parts, for the logs).
    """
    valid = [p is not None for p in parsed]
    asked = [i for i, ok in enumerate(valid) if ok]
    responses, answers = reasoner.answer(reasoner_model, tokenizer, image_processor,
                                         [question_images[i] for i in asked],
                                         [parsed[i]["question"] for i in asked],
                                         reward.m, answer_settings, generator, batch_tokens) if asked else ([], [])
    details = [{"question": p["question"] if p else None, "raw": t, "valid": ok, "answers": [], "responses": [],
                "silver": None, "confidence": 0.0, "uncertainty": 0.0} for p, t, ok in zip(parsed, texts, valid)]
    for i, group_responses, group_answers in zip(asked, responses, answers):
        silver, confidence = majority_vote(group_answers, count_empty=reward.count_empty)
        details[i].update(answers=group_answers, responses=group_responses, silver=silver, confidence=confidence,
                          uncertainty=uncertainty_reward(confidence, reward.uncertainty_scale))
    compared = [p["question"] if p else t for p, t in zip(parsed, texts)]
    diversity = diversity_penalty(compared, group_ids, scope=reward.diversity_scope,
                                  weight=reward.diversity_weight, threshold=reward.diversity_threshold)
    rewards = questioner_reward([d["uncertainty"] for d in details], diversity, valid, combine=reward.combine)
    for d, div, r in zip(details, diversity, rewards):
        d.update(diversity=div, reward=r)
    return rewards, details


def rollouts(questioner_model, reasoner_model, tokenizer, image_processor, images, G, question_settings,
             answer_settings, reward, generator, batch_tokens, fmt="paper"):
    """G questions per image from the Questioner, rewarded with the frozen Reasoner; each sampler
    call fills a KV cache of at most `batch_tokens` tokens.

    Returns (Rollouts of len(images) * G rows, details: one dict per question, see score_questions).
    """
    prompts, out, texts, parsed = write_questions(questioner_model, tokenizer, image_processor, images, G,
                                                  question_settings, generator, batch_tokens, fmt)
    group_ids = [i // G for i in range(len(texts))]
    rewards, details = score_questions(reasoner_model, tokenizer, image_processor,
                                       [images[g] for g in group_ids], parsed, texts, group_ids,
                                       reward, answer_settings, generator, batch_tokens)
    return Rollouts(prompts.repeat(G), out.ids.cpu(), out.mask.cpu(), torch.tensor(rewards), group_size=G,
                    max_new_tokens=question_settings.max_new_tokens), details
