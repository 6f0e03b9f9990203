"""The CPU decoder (machinery/cpu_decode.py) against the reference decoder: the same samples."""

from pathlib import Path

import pytest
import torch

import data
from tools import pretrain
from machinery.cpu_decode import Prefill, ShrinkingDecoder
from machinery.fast_decode import decoder_for
from machinery.keys import prompt_keys
from model import encode_prompts, load_vlm
from reasoner import reasoner_prompt
from sampler import CacheDecoder, sample


SHAPES_BASE = Path(__file__).resolve().parents[1] / "examples" / "shapes5_base"


def shapes_prompts(seed, n=10):
    """The ablations' shapes model and n of its questions: its answers stop at different lengths
    (its guesses on counting and arithmetic after about 15 tokens, its checks after about 30)."""
    world = pretrain.load_config(SHAPES_BASE)
    questions = data.shapes_benchmark(n, seed=seed, categories=world.categories.split(","), **world.world())
    model, tok, ip = load_vlm(str(SHAPES_BASE))
    return model, encode_prompts(tok, ip, [q["image"] for q in questions],
                                 [reasoner_prompt(q["question"]) for q in questions])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, top_k=40, top_p=0.95),
                                      dict(temperature=1.0, top_p=0.99)])
def test_the_cpu_decoder_samples_what_the_reference_samples(seed, settings):
    """Greedy, and the roles' truncated sampling: the same ids, masks and log-probs as
    CacheDecoder, though the rows that stop are dropped along the way."""
    model, prompts = shapes_prompts(seed)
    keys = prompt_keys(seed, n=len(prompts))
    reference = sample(model, prompts, n=5, max_new_tokens=40, keys=keys, decoder=CacheDecoder, **settings)
    computed = []

    class Watched(ShrinkingDecoder):
        def step(self, tokens):
            hidden = super().step(tokens)
            computed.append(len(self.computed))
            return hidden

    ours = sample(model, prompts, n=5, max_new_tokens=40, keys=keys, decoder=Watched, **settings)
    assert min(computed) < len(reference.ids), "rows stop at different steps, and the stopped ones are dropped"
    assert torch.equal(ours.ids, reference.ids) and torch.equal(ours.mask, reference.mask)
    assert torch.allclose(ours.logprobs, reference.logprobs, atol=1e-5, rtol=0)  # float32 rows, other batch shapes


def test_a_prefill_serves_several_calls_and_only_its_own_prompts():
    model, prompts = shapes_prompts(0)
    prefill = Prefill(model, prompts)
    for n, settings in ((1, dict(temperature=0.0)), (3, dict(temperature=1.0, keys=prompt_keys(2, n=len(prompts))))):
        reference = sample(model, prompts, n=n, max_new_tokens=20, decoder=CacheDecoder, **settings)
        shared = sample(model, prompts, n=n, max_new_tokens=20, decoder=prefill.decoder, **settings)
        assert torch.equal(shared.ids, reference.ids)
        assert torch.allclose(shared.logprobs, reference.logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="the model and prompts it was made from"):
        sample(model, prompts.select([0, 1]), max_new_tokens=4, temperature=0.0, decoder=prefill.decoder)


def test_the_sampler_decodes_on_cpu_with_it():
    assert decoder_for(torch.device("cpu")) is ShrinkingDecoder
