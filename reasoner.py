"""The Reasoner role: answer a question about an image, step by step, with a final \\boxed{} answer
(spec: "Reasoner", and "Roles and loop" step 2, curation).

Three things live here:
1. `reasoner_prompt`: the instruction wrapped around a question (also the evaluation prompt).
2. `answer`: m answers to each (image, question) pair from one prefill per pair (the sampler's
   prefix sharing), reduced to their \\boxed{} contents. The Questioner's reward and curation both
   use it with a frozen Reasoner.
3. `curate` + `rollouts`: majority vote -> silver label and confidence c, keep τ_low <= c <= τ_high,
   then G answers per kept question scored against the silver label, ready for GRPO.
"""

import torch

from grpo import Rollouts
from model import encode_prompts
from rewards import extract_boxed, majority_vote, reasoner_reward
from sampler import sample_in_batches

REASONER_PROMPT = ("{question}\n\nReason step by step inside <think> </think>, then give the final, "
                   "concise answer inside \\boxed{{}}.")


def reasoner_prompt(question):
    return REASONER_PROMPT.format(question=question)


def answer(model, tokenizer, image_processor, images, questions, m, settings, generator, batch_tokens):
    """m sampled responses to each (image, question) pair.

    images: list[PIL], questions: list[str], same length N -> (responses: N lists of m str,
    answers: N lists of m str | None, the last \\boxed{} of each response). Pairs go through the
    model as many at a time as fit in a KV cache of `batch_tokens` tokens (sampler.sample_in_batches).
    """
    prompts = encode_prompts(tokenizer, image_processor, images, [reasoner_prompt(q) for q in questions])
    out = sample_in_batches(model, prompts.to(model.device), batch_tokens, n=m, generator=generator, **vars(settings))
    texts = out.texts(tokenizer)
    responses = [texts[i:i + m] for i in range(0, len(texts), m)]
    return responses, [[extract_boxed(r) for r in group] for group in responses]



def curate(answers, tau_low, tau_high, count_empty=False):
    """Silver labels and the confidence band. answers: N lists of m (str | None) ->
    N dicts {silver, confidence, kept}. A question is kept iff it has a silver label and
    tau_low <= c <= tau_high: too easy (everyone agrees) and too hard (no agreement) teach little.
    """
    records = []
    for group in answers:
        silver, confidence = majority_vote(group, count_empty=count_empty)
        kept = silver is not None and tau_low <= confidence <= tau_high
        records.append({"silver": silver, "confidence": confidence, "kept": kept})
    return records


def rollouts(model, tokenizer, image_processor, images, questions, silver_labels, G, settings, generator,
             batch_tokens, reward_mode="paper"):
    """G answers per (image, question, silver label) triple, rewarded against the label; as many
    triples per sampler call as fit in a KV cache of `batch_tokens` tokens.

    Returns (Rollouts with B = len(questions) * G rows in group-major order, texts: list of B str).
    """
    prompts = encode_prompts(tokenizer, image_processor, images, [reasoner_prompt(q) for q in questions])
    out = sample_in_batches(model, prompts.to(model.device), batch_tokens, n=G, generator=generator, **vars(settings))
    texts = out.texts(tokenizer)
    labels = [label for label in silver_labels for _ in range(G)]
    rewards = torch.tensor([reasoner_reward(t, s, mode=reward_mode) for t, s in zip(texts, labels)])
    return (Rollouts(prompts.repeat(G), out.ids.cpu(), out.mask.cpu(), rewards, group_size=G,
                     max_new_tokens=settings.max_new_tokens), texts)
