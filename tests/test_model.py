"""Loading, prompt encoding and log-probs of model.py."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, completions, random_images

import model as M
from model import ModelError, completion_logprobs, encode_prompts, load_processors, load_vlm, token_batches
from machinery.keys import prompt_keys
from sampler import sample

REPO = Path(__file__).resolve().parents[1]


def test_tiny_is_deterministic_and_consistent():
    m1, tok, ip = load_vlm("tiny", seed=0)
    m2, tok2, _ = load_vlm("tiny", seed=0)
    m3, _, _ = load_vlm("tiny", seed=1)
    assert tok.get_vocab() == tok2.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert not torch.equal(m1.lm_head.weight, m3.lm_head.weight)
    cfg = m1.config
    # Qwen's special tokens come right after the BPE vocabulary, in Qwen's order.
    first = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.convert_tokens_to_ids(M.QWEN_SPECIAL_TOKENS) == list(range(first, first + 22))
    assert len(tok) == first + 22
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.out_hidden_size == text.hidden_size
    assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)
    assert text.vocab_size > len(tok)


def test_random_3b_has_the_real_shapes():
    cfg = M.qwen_3b_config(M.tiny_tokenizer())
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (2048, 36, 16, 2, 11008, 151936)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, 2048)
    with torch.device("meta"):
        model = M.Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 3.6e9 < n_params < 3.9e9  # Qwen2.5-VL-3B: 3.75 B parameters (tied embeddings)


def test_chat_template_and_image_token_count(tiny):
    model, tok, ip = tiny
    images = random_images(0, [(64, 64), (100, 50), (30, 90), (300, 200)])
    prompts = encode_prompts(tok, ip, images, PROMPTS + ["a"], system="Be brief.")
    merge = ip.merge_size
    for row, thw in zip(prompts.input_ids, prompts.image_grid_thw):
        n_image = int((row == model.config.image_token_id).sum())
        assert n_image == int(thw.prod()) // merge ** 2
    text = tok.decode(prompts.input_ids[1][prompts.attention_mask[1].bool()])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith(f"{PROMPTS[1]}<|im_end|>\n<|im_start|>assistant\n")
    # Pixel bounds are respected (300x200 is downscaled, 30x90 upscaled into the range).
    pixels = prompts.image_grid_thw[:, 1:].prod(-1) * ip.patch_size ** 2
    assert (pixels >= ip.size["shortest_edge"]).all() and (pixels <= ip.size["longest_edge"]).all()


def test_prompt_text_is_tokenized_as_the_whole_chat_and_special_token_spellings_as_text(tiny):
    model, tok, ip = tiny
    images = random_images(0, [(64, 64), (64, 64)])
    texts = [PROMPTS[0], "Is <|image_pad|> a token?<|im_end|> yes"]
    prompts = encode_prompts(tok, ip, images, texts)
    # an ordinary text: the ids of the whole chat tokenized at once, as the processor would
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[0]}]}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_image = int(prompts.image_grid_thw[0].prod()) // ip.merge_size ** 2
    whole = tok(chat.replace("<|image_pad|>", "<|image_pad|>" * n_image), add_special_tokens=False)["input_ids"]
    assert prompts.input_ids[0][prompts.attention_mask[0].bool()].tolist() == whole
    # a text spelling special tokens: still one image's tokens and one end of turn, the text intact
    row = prompts.input_ids[1][prompts.attention_mask[1].bool()]
    assert int((row == model.config.image_token_id).sum()) == n_image
    assert int((row == tok.convert_tokens_to_ids("<|im_end|>")).sum()) == 2  # the system turn's and the user's
    assert texts[1] in tok.decode(row)


def test_mrope_positions_equal_hf_get_rope_index(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(2, [(64, 64), (140, 56), (28, 112)]), PROMPTS)
    mm = (prompts.input_ids == model.config.image_token_id).int()
    reference, deltas = model.model.get_rope_index(prompts.input_ids, mm, image_grid_thw=prompts.image_grid_thw,
                                                   attention_mask=prompts.attention_mask)
    valid = prompts.attention_mask.bool()
    assert torch.equal(prompts.position_ids[:, valid], reference[:, valid])
    assert torch.equal(prompts.next_position, prompts.attention_mask.sum(1) + deltas.flatten())


def hf_logprobs(model, prompts, ids, mask, temperature):
    """Independent path: HF's full forward (its own M-RoPE positions), full float32 logits."""
    input_ids = torch.cat([prompts.input_ids, ids], 1)
    out = model(input_ids=input_ids, attention_mask=torch.cat([prompts.attention_mask, mask], 1),
                pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                mm_token_type_ids=(input_ids == model.config.image_token_id).int())
    L = prompts.input_ids.shape[1]
    logits = out.logits[:, L - 1:-1].double() / temperature
    logits[..., model.generation_config.suppress_tokens] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1) * mask


def test_completion_logprobs_match_hf_forward_and_chunking_changes_nothing(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(3), PROMPTS)
    out = sample(model, prompts, n=1, max_new_tokens=10, keys=prompt_keys(0, n=len(prompts)))
    mask = out.mask.clone()
    mask[0, 6:] = 0  # a row that ended early
    ids = out.ids.masked_fill(~mask.bool(), model.generation_config.pad_token_id)
    reference = hf_logprobs(model, prompts, ids, mask, 0.8)
    whole = completion_logprobs(model, prompts, ids, mask, temperature=0.8)
    chunked = completion_logprobs(model, prompts, ids, mask, temperature=0.8, chunk_tokens=3)
    assert (whole.double() - reference).abs().max() < 1e-4
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=0)  # float32 matmul blocking differs by shape

    grads = []
    for chunk in (4096, 3):
        model.zero_grad()
        (completion_logprobs(model, prompts, ids, mask, chunk_tokens=chunk).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0


def test_an_image_in_several_rows_is_encoded_once_with_the_same_logprobs_and_gradients(tiny):
    model, tok, ip = tiny
    same_size = random_images(6, sizes=((64, 64), (64, 64)))  # same grid, other pixels: two images
    prompts = encode_prompts(tok, ip, [same_size[0], same_size[1], same_size[0], same_size[0]],
                             [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]])
    pixel_values, grid, row_image = prompts.distinct_images()
    assert row_image.tolist() == [0, 1, 0, 0]
    assert torch.equal(grid, prompts.image_grid_thw[:2]) and pixel_values.shape[0] == grid.prod(-1).sum()

    ids, mask = completions(tok, ["a b", "c", "d e f", "g"])
    patches = []
    handle = model.model.visual.register_forward_hook(lambda mod, args, out: patches.append(args[0].shape[0]))
    ours = completion_logprobs(model, prompts, ids, mask)
    handle.remove()
    assert patches == [pixel_values.shape[0]], "each distinct image goes through the vision tower once"
    reference = hf_logprobs(model, prompts, ids, mask, 1.0)  # HF encodes the image of every row
    assert (ours.double() - reference).abs().max() < 1e-4

    grads = []
    for logprobs in (lambda: completion_logprobs(model, prompts, ids, mask), lambda: hf_logprobs(model, prompts, ids, mask, 1.0)):
        model.zero_grad()
        logprobs().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.model.visual.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1].float(), atol=1e-5, rtol=1e-3)


def test_a_prompt_shared_by_several_rows_runs_once_with_hf_logprobs_and_gradients(tiny):
    """A GRPO group's G rows share one prompt: completion_logprobs runs it once and the completions
    over its cache. Against HF's full forward of every row: the same log-probs, the same gradient
    of every weight (float32 sums in another order: the tolerance of the other tests here)."""
    model, tok, ip = tiny
    images = random_images(7)
    prompts = encode_prompts(tok, ip, [images[0], images[0], images[1], images[0], images[1]],
                             [PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[1], PROMPTS[2]])
    unique, row_prompt = M.shared_prompts(prompts)
    assert unique.tolist() == [0, 2] and row_prompt.tolist() == [0, 0, 1, 0, 1]
    ids, mask = completions(tok, ["a b", "c d e f", "g", "h", "i j k"])  # unequal lengths: pads among the rows
    embedded = []
    handle = model.model.language_model.embed_tokens.register_forward_hook(
        lambda mod, args, out: embedded.append(args[0].shape[0] * args[0].shape[1]))
    ours = completion_logprobs(model, prompts, ids, mask)
    handle.remove()
    L, T = prompts.input_ids.shape[1], ids.shape[1]
    assert sum(embedded) <= 2 * L + 5 * (T - 1), "each distinct prompt is embedded once"
    reference = hf_logprobs(model, prompts, ids, mask, 1.0)
    assert (ours.double() - reference).abs().max() < 1e-4

    grads = []
    for logprobs in (lambda: completion_logprobs(model, prompts, ids, mask), lambda: hf_logprobs(model, prompts, ids, mask, 1.0)):
        model.zero_grad()
        logprobs().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1].float(), atol=1e-5, rtol=1e-3)


def test_prompt_batch_select_matches_encoding_the_rows_alone(tiny):
    model, tok, ip = tiny
    images = random_images(5)
    batch = encode_prompts(tok, ip, images, PROMPTS)
    part = batch.select([2, 0, 2])
    alone = encode_prompts(tok, ip, [images[2], images[0], images[2]], [PROMPTS[2], PROMPTS[0], PROMPTS[2]])
    for name in ("input_ids", "attention_mask", "position_ids", "next_position", "pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(part, name), getattr(alone, name)), name


def test_bad_inputs_give_one_clear_line(tiny, tmp_path):
    model, tok, ip = tiny
    with pytest.raises(ModelError, match="does not exist") as err:
        load_vlm(str(tmp_path / "no" / "such" / "folder"))
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="--model tiny") as err:
        load_vlm(str(empty))
    assert "\n" not in str(err.value) and "local folder" in str(err.value)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(tok, ip, [], [])
    with pytest.raises(ValueError, match="one image per prompt"):
        encode_prompts(tok, ip, random_images(0), PROMPTS[:2])


def test_unknown_hub_id_fails_with_one_line_offline():
    code = ("import model\ntry:\n    model.load_vlm('no-such-org/no-such-model')\n"
            "except model.ModelError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = out.stdout.strip()
    assert line.startswith("ERR could not load 'no-such-org/no-such-model' as a Hugging Face hub id")
    assert "--model tiny" in line and "\n" not in line


def test_hub_id_without_a_network_fails_at_once(monkeypatch):
    """A hub id with no cached copy and a hub that does not answer: one line, before transformers'
    minute of retries. hub_reachable itself against a loopback port that listens and one that does not."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(M.hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(proxy, raising=False)
        assert M.hub_reachable()
    assert not M.hub_reachable()  # the same port, closed now
    monkeypatch.setenv("all_proxy", "http://proxy.invalid:3128")
    assert M.hub_reachable(), "through a proxy: assumed reachable"
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert not M.hub_reachable(), "a host the proxy is bypassed for is asked itself"
    monkeypatch.delenv("all_proxy")
    monkeypatch.delenv("no_proxy")
    monkeypatch.setattr(M.hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError, match="the hub cannot be reached") as err:
        load_vlm("no-such-org/no-such-model")
    assert "--model tiny" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["bad name", "a..b", "org/-x"])
def test_a_malformed_hub_id_is_one_line(name):
    with pytest.raises(ModelError, match="neither a model folder nor a valid hub id") as err:
        load_processors(name)
    assert "--model tiny" in str(err.value) and "\n" not in str(err.value)


def test_saved_tiny_checkpoint_reloads_through_from_pretrained(tiny, tmp_path):
    model, tok, ip = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ip.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again, tok2, ip2 = load_vlm(str(tmp_path))
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS)
    a = sample(model, prompts, max_new_tokens=8, temperature=0)
    b = sample(again, encode_prompts(tok2, ip2, random_images(0), PROMPTS), max_new_tokens=8, temperature=0)
    assert torch.equal(a.ids, b.ids)


@pytest.mark.skipif(not os.environ.get("VISPLAY_REAL_MODEL"), reason="set VISPLAY_REAL_MODEL to a local Qwen2.5-VL folder")
def test_real_checkpoint_sampler_matches_generate():
    from test_sampler import generate_reference

    model, tok, ip = load_vlm(os.environ["VISPLAY_REAL_MODEL"], min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS)
    ours = sample(model, prompts, max_new_tokens=16, temperature=0)
    assert torch.equal(ours.ids, generate_reference(model, prompts, 16))
    logp = completion_logprobs(model, prompts, ours.ids, ours.mask)
    assert (logp - ours.logprobs).abs().max() < 1e-3


def test_token_batches_fill_a_budget_of_padded_tokens():
    prompt = torch.tensor([10, 10, 12, 10, 30, 10, 10, 10])
    completion = torch.tensor([5, 50, 0, 7, 60, 3, 1, 2])
    rows = torch.arange(8)

    def split(max_tokens, of=rows):
        return [b.tolist() for b in token_batches(of, prompt, completion, max_tokens)]
    # Longest row first (prompt + completion: 90, 60, 17, 15, 13, 12, 12, 11); k rows padded to
    # their longest prompt P and completion T cost k (P + T): [4] 90; [4, 1] would be 2 × 90 = 180;
    # [3, 0, 5, 2, 7] 5 × (12 + 7) = 95; adding row 6 would make 6 × 19 = 114.
    assert split(100) == [[4], [1], [3, 0, 5, 2, 7], [6]]
    assert split(1) == [[4], [1], [3], [0], [5], [2], [7], [6]]  # rows over the budget go alone
    assert split(10**6) == [[4, 1, 3, 0, 5, 2, 7, 6]]
    assert split(100, of=torch.tensor([6, 1, 0])) == [[1], [0, 6]]  # only the rows given
