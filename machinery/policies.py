"""The roles' weights as the self-play loop uses them: the role in training (`Trainee`: its weights,
its AdamW, one GRPO step, its checkpoints) and the frozen models beside it (the KL reference and,
for the Questioner, the Reasoner that rewards it).

Two ways to train a role, chosen by --lora-rank:
- full fine-tuning: the role's checkpoint loaded in float32 (the master weights; matmuls in bf16
  under autocast on a GPU, model.autocast), every weight trained; frozen models are bf16 on a GPU.
- LoRA (lora.py): every role is the one frozen base model plus its low-rank updates, kept as
  factors across phases; a fresh adapter is the only trainable part. The role folder then also
  holds `lora_updates.safetensors`, from which the role's next phase starts, and frozen roles
  share the base weights of the model in training (lora.shared_copy).

Where a role starts ("source") is the base model in iteration 1 and the role's own folder of the
previous iteration after that (runfolder.Run.role_source): Q_k starts from Q_{k-1}, R_k from R_{k-1}
(METHOD.md, (23) and (25)).
"""

import contextlib
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from machinery import distributed as dist
from machinery import fsdp
import grpo
from machinery import lora
from data import DataError
from model import Processors, load_processors, load_vlm, rollout_logprobs
from machinery.fast_decode import decoder_for
from sampler import Sampler, SamplingSettings

LORA_UPDATES = "lora_updates.safetensors"


PAPER_MAX_PIXELS = 4_194_304


def resolve_pixel_bounds(cfg):
    """cfg with its image sizes made explicit (so config.json says what ran): --min-pixels and
    --max-pixels as given, or, where 0, the model's own bounds, the upper one at most the paper's
    4,194,304 pixels (Qwen2.5-VL's own, 12.8 million, gives a 12-megapixel photo 16,384 image
    tokens). Loads the model's processors: a model that cannot load stops here, before any file
    is written."""
    size = load_processors(cfg.model).image_processor.size
    return dataclasses.replace(cfg, min_pixels=cfg.min_pixels or size["shortest_edge"],
                               max_pixels=cfg.max_pixels or min(size["longest_edge"], PAPER_MAX_PIXELS))


def sampling_settings(cfg):
    """How each of the loop's four kinds of sampler call samples: the rollouts of both roles
    (question, answer), the frozen Reasoner's votes, for the Questioner's reward and in curation
    alike (the public code's temperature 1, top-k 40), and curation's candidate questions (its
    top-p 0.95)."""
    return SimpleNamespace(
        question=SamplingSettings(max_new_tokens=cfg.question_max_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p),
        answer=SamplingSettings(max_new_tokens=cfg.answer_max_tokens, temperature=cfg.temperature, top_p=cfg.top_p),
        vote=SamplingSettings(max_new_tokens=cfg.answer_max_tokens, temperature=cfg.vote_temperature,
                              top_k=cfg.vote_top_k),
        candidate=SamplingSettings(max_new_tokens=cfg.question_max_tokens, temperature=cfg.temperature,
                                   top_p=cfg.curation_top_p))


def weights_dtype(device, trainable):
    """Trained weights are float32 (the master copy; model.autocast gives bf16 compute on CUDA);
    frozen ones are bf16 on a GPU, where memory is what they cost, and float32 elsewhere."""
    return torch.float32 if trainable or device.type != "cuda" else torch.bfloat16


def load_model(cfg, source, device, trainable):
    """A model and its Processors, in the dtype of weights_dtype."""
    model, tokenizer, image_processor = load_vlm(source, device=device, dtype=weights_dtype(device, trainable),
                                                 seed=cfg.seed, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model.requires_grad_(trainable)
    return model, Processors(tokenizer, image_processor)


def lora_updates(cfg, source):
    """The updates a LoRA role has made by `source`: none at the base model."""
    if source == cfg.model:
        return {}
    if not (Path(source) / LORA_UPDATES).exists():
        raise DataError(f"cannot continue this LoRA run: '{source}' has no {LORA_UPDATES} (the role's updates)")
    return load_file(Path(source) / LORA_UPDATES)


def lora_base(cfg, device):
    """The frozen base model with adapters (lora.add_lora; the trainable parts from the seed)."""
    model, processors = load_model(cfg, cfg.model, device, trainable=False)
    lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    return model, processors


def role_weights(cfg, source, device):
    """A role as it is at `source`, in the form it trains in. Full fine-tuning: the float32 weights
    of the checkpoint there. LoRA: the base model's weights, frozen (bf16 on a GPU), the role's
    updates so far as frozen factors, and a fresh adapter, the only trainable part."""
    if cfg.lora_rank == 0:
        return load_model(cfg, source, device, trainable=True)
    model, processors = lora_base(cfg, device)
    lora.set_past(model, lora_updates(cfg, source))
    return model, processors


def sampling_role(cfg, device, source, beside=None):
    """A role that only samples, as it is at `source`: the checkpoint there, or with LoRA the base
    plus the updates there. `beside`: a model of this LoRA run already in memory, whose weights the
    role then shares (lora.shared_copy) instead of loading the base again."""
    if cfg.lora_rank == 0:
        return load_model(cfg, source, device, trainable=False)[0]
    if beside is None:
        beside = lora_base(cfg, device)[0]
    return lora.shared_copy(beside, lora_updates(cfg, source))


def frozen_models(cfg, policy, start, reasoner_source=None):
    """The KL term's reference of a policy that started its phase at `start`, and the frozen
    Reasoner at `reasoner_source` (the Questioner's phase only). Returns (reference or None,
    reasoner or None).

    The reference is the role at the start of the iteration (--kl-reference iteration) or the base
    model: with LoRA, when that is where the policy started, the policy itself with its adapter off;
    otherwise a frozen model, which with LoRA shares the policy's weights. Each source is loaded
    once (in iteration 1 the Questioner's reference and its Reasoner are both the base).
    """
    loaded = {}

    def frozen(source):
        if source not in loaded:
            loaded[source] = sampling_role(cfg, policy.device, source, beside=policy)
        return loaded[source]

    reference = None
    if cfg.kl_coef > 0:
        source = cfg.model if cfg.kl_reference == "base" else start
        reference = policy if cfg.lora_rank > 0 and source == start else frozen(source)
    return reference, frozen(reasoner_source) if reasoner_source else None


def save_role(cfg, model, processors, folder, weights=None):
    """A checkpoint loadable by plain transformers (safetensors); with LoRA the adapters merged in
    (in float32: a small update would round away in bf16), and the role's updates beside it.
    weights: the state dict to write, when the model's own is sharded (fsdp.whole_weights). Folder
    None: another process writes (runfolder.Run.save_folder)."""
    if folder is None:
        return
    if cfg.lora_rank > 0:
        save_file(lora.updates(model), Path(folder) / LORA_UPDATES)
        model = lora.merge_lora(model.float())
    model.save_pretrained(folder, state_dict=weights)
    processors.save_pretrained(folder)


def as_sampler(cfg, model, processors):
    """A model ready to sample (sampler.Sampler): its decoder on its device, the run's KV-cache budget."""
    return Sampler(model, processors, decoder_for(model.device), cfg.sampling_batch_tokens)


def rollout_metrics(rewards, lengths):
    """What a rollout batch says about the policy, from its rewards and completion lengths, [n_groups,
    G] each: reward mean and spread, the share of groups whose rewards are all equal (advantage 0:
    they teach nothing), completion lengths."""
    lengths = lengths.float()
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "zero_var_frac": float((rewards.std(1) == 0).float().mean()) if rewards.shape[1] > 1 else 1.0,
            "completion_len": float(lengths.mean()), "completion_tokens": int(lengths.sum())}


class Trainee:
    """The role in training: its weights (`role_weights` at `source`), Processors and AdamW, resumed
    from `checkpoint` (a folder `save_checkpoint` wrote) when given; `sampler` samples from it (a
    sampler.Sampler). With --fsdp and several processes, the model is sharded over them (fsdp.py)
    and the sampler's model is a whole copy of it, refreshed after each GRPO step."""

    def __init__(self, cfg, source, device, checkpoint=None):
        self.cfg = cfg
        use_lora = cfg.lora_rank > 0
        self.sharded = cfg.fsdp and dist.world_size() > 1
        # A full fine-tuning checkpoint is a whole model; a LoRA one holds only the adapters.
        self.model, self.processors = role_weights(cfg, str(checkpoint) if checkpoint and not use_lora else source,
                                                   device)
        if cfg.freeze_vision:
            self.model.model.visual.requires_grad_(False)
        # The sampler never runs a sharded model (fsdp.py): it gets a whole copy, in the frozen models' dtype.
        self.sampler = as_sampler(cfg, fsdp.sampling_copy(self.model, weights_dtype(device, trainable=False))
                                  if self.sharded else self.model, self.processors)
        if cfg.gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        if self.sharded:
            fsdp.shard(self.model)
        self.optimizer = grpo.make_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if checkpoint:
            if use_lora:
                lora.load_lora_state_dict(self.model, torch.load(Path(checkpoint) / "lora.pt", weights_only=True,
                                                                 map_location=device))
            # sharded, every process reads the whole state (mapped, not loaded) and keeps its shards
            state = torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True,
                               map_location="cpu" if self.sharded else device, mmap=self.sharded)
            if self.sharded:
                fsdp.load_optimizer_state(self.optimizer, state)
            else:
                self.optimizer.load_state_dict(state)

    def grpo_step(self, rollouts, reference, batch=None):
        """GRPO on one rollout batch (grpo.update, METHOD.md (14)-(22)), the KL term against
        `reference`; or, with several processes, on this process's share of it (`batch`, the
        machinery.batch.Batch of its prompts; None: the whole batch is here). Returns the whole
        batch's rollout metrics and the update's."""
        cfg, G = self.cfg, rollouts.group_size
        share = batch.share if batch else dist.Share(range(len(rollouts) // G))
        rewards = share.gather(rollouts.rewards.view(-1, G))  # [n_groups, G], every process's groups
        advantages = share.take(grpo.group_advantages(rewards, cfg.advantage_scale)).flatten()  # [B], this share's
        update = grpo.update(self.model, self.optimizer, rollouts, advantages,
                             reference_logprobs(cfg, self.model, reference, rollouts),
                             temperature=cfg.temperature, micro_batch_tokens=cfg.micro_batch_tokens,
                             minibatches=cfg.minibatches, epochs=cfg.epochs, clip_low=cfg.clip_low,
                             clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl_coef=cfg.kl_coef,
                             aggregation=cfg.aggregation, max_grad_norm=cfg.max_grad_norm,
                             reduce=dist.reduce_for(share, G, self.sharded))
        if self.sharded:
            fsdp.copy_weights(self.model, self.sampler.model)
        return {**rollout_metrics(rewards, share.gather(rollouts.mask.sum(1).view(-1, G))), **update}

    def save_checkpoint(self, folder):
        """What a resume needs: the weights (with LoRA only the adapters) and AdamW's state. Called
        in every process, with folder None but in rank 0 (runfolder.Run.save_folder): sharded, every
        process gathers the weights and the optimizer's state, and rank 0 writes them whole, the
        files of an unsharded run."""
        if self.sharded:
            weights, optimizer = fsdp.whole_weights(self.model), fsdp.whole_optimizer_state(self.optimizer)
        else:
            weights, optimizer = None, self.optimizer.state_dict()
        if folder is None:
            return
        if self.cfg.lora_rank > 0:
            torch.save(lora.lora_state_dict(self.model), Path(folder) / "lora.pt")
        else:
            self.model.save_pretrained(folder, state_dict=weights)
            self.processors.save_pretrained(folder)
        torch.save(optimizer, Path(folder) / "optimizer.pt")

    def save_role(self, folder):
        """save_role of the model, in every process as save_checkpoint."""
        weights = fsdp.whole_weights(self.model) if self.sharded else None
        save_role(self.cfg, self.model, self.processors, folder, weights)


def reference_logprobs(cfg, policy, reference, rollouts):
    """[B, T] log-probs of the rollouts under the KL reference (None without one)."""
    if reference is None:
        return None
    with lora.adapters(policy, False) if reference is policy else contextlib.nullcontext():
        return rollout_logprobs(reference, rollouts, cfg.micro_batch_tokens, cfg.temperature)
