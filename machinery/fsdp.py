"""--fsdp: the role in training sharded over torchrun's processes with FSDP2 (torch's fully_shard),
for a model whose float32 weights, gradients and AdamW state do not fit one GPU (full fine-tuning
only: LoRA trains little, and every process holds its frozen base anyway). Each process then holds
1/N of them. The rest of the loop is distributed.py's, and the result is the same as without it up
to float rounding (on a GPU the rollouts come from a bf16 copy rather than the float32 weights).

- Sampling never runs the sharded model: FSDP gathers a layer's weights from every process at each
  of its forward passes, so each decode step would gather the whole model, with all processes in
  lockstep although each decodes its own rows to its own lengths. The sampler gets a whole copy
  (`sampling_copy`: bf16 on a GPU, like the frozen models), refreshed from the shards after each
  GRPO step (`copy_weights`).
- Gradients: FSDP reduce-scatters them after each backward pass and would divide the sum by N (a
  mean). Here a process's loss is its share of the mini-batch's loss (distributed.py), so the sum is
  the one-process gradient as it stands: divide factor 1, by a plain SUM (gloo has nothing else),
  and no distributed.sum_gradients. The clip's norm over the shards (DTensors) is the global norm.
- Padding passes: every forward pass gathers weights from all processes, so all must make as many.
  A process with fewer micro-batches than another (in a mini-batch, or in the old log-probs' pass)
  adds passes that change nothing (grpo.update, with distributed.reduce_for).
- Checkpoints hold whole tensors in the files and format of a run without --fsdp (`whole_weights`,
  `whole_optimizer_state`, `load_optimizer_state`), so a run resumes with any number of processes,
  with or without --fsdp. Gathering them is a collective: every process takes part, rank 0 writes.

In one process --fsdp changes nothing: a shard of one is the whole model.
"""

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from machinery import distributed as dist
from model import completion_logprobs


def shard(model):
    """Shards a Qwen2.5-VL model in place: each vision block and decoder layer, then the root, which
    keeps the rest (the embedding and lm_head, so a tied pair stays tied; the vision tower's patch
    embedding and merger; the final norm). FSDP keeps the root's weights gathered from a forward
    pass to its backward, so after a no-grad pass (the old log-probs) they stay gathered, plain
    tensors among the DTensors, until the next backward; nothing reads the weights in between."""
    # the processes' mesh on the model's own device type (left to itself, FSDP picks the machine's
    # accelerator, and would move a CPU run's weights to the GPU)
    mesh = init_device_mesh(model.device.type, (dist.world_size(),))
    for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # completion_logprobs reaches into the model (the vision tower, the embedding, lm_head's weight)
    # rather than calling its forward, so it becomes a forward method of the root, which gathers
    # the root's weights around it and reduce-scatters their gradients. (A copy, not its view of the
    # log-probs: FSDP warns of a view, which an in-place op would cut off from its backward hook.)
    model.completion_logprobs = lambda *args: completion_logprobs(model, *args, share=False).clone()
    register_fsdp_forward_method(model, "completion_logprobs")


def sharded(model):
    return isinstance(model, FSDPModule)


def sampling_copy(model, dtype):
    """A whole copy of the (not yet sharded) model for the sampler, frozen, in dtype: copied weight
    by weight (deepcopy's memo), so there is never a second float32 model in memory."""
    cast = {id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, cast).to(dtype)  # (its buffers too, as load_vlm casts a model)


@torch.no_grad()
def copy_weights(model, whole):
    """whole's weights set to the sharded model's, gathered one at a time (in every process)."""
    weights = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        weights[name].copy_(p.full_tensor())


@torch.no_grad()
def _gathered(items):
    """(key, value) pairs -> {key: value} with each DTensor gathered whole, on the CPU, in rank 0
    ({} elsewhere). Every process must call it: each gather is a collective."""
    whole = {}
    for key, value in items:
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if dist.rank() == 0:
            whole[key] = value.cpu()
    return whole


def whole_weights(model):
    """The sharded model's weights, whole, in rank 0 ({} elsewhere): a state dict for
    save_pretrained, a tied weight once (under the embedding's name, as save_pretrained keeps it)."""
    return _gathered(model.named_parameters())


def whole_optimizer_state(optimizer):
    """optimizer.state_dict() of an optimizer over sharded weights, with whole tensors: what the
    same optimizer over the whole model gives, in rank 0 (None elsewhere)."""
    state = optimizer.state_dict()
    whole = {i: _gathered(values.items()) for i, values in state["state"].items()}
    return dict(state, state=whole) if dist.rank() == 0 else None


def load_optimizer_state(optimizer, state):
    """An optimizer over sharded weights set to a whole state (`whole_optimizer_state`, or an
    unsharded optimizer's state_dict): each process keeps its shards of the per-weight tensors."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard_of(p, value):
        if value.shape != p.shape:  # the step count
            return value
        return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)  # no communication
    state = dict(state, state={i: {k: shard_of(params[i], v) for k, v in values.items()}
                               for i, values in state["state"].items()})
    optimizer.load_state_dict(state)
