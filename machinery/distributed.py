"""More than one process: torchrun starts one per GPU, each holding full copies of the models, and
this file is all they say to each other (plain torch.distributed). In one process every function
here gives back what it was given, so the loop reads the same for 1 or N processes. (With --fsdp
the role in training is sharded over the processes instead of copied: fsdp.py.)

    torchrun --nproc-per-node 8 selfplay.py --images dir/ --output runs/name

A run's result does not depend on how many processes ran it. Every process runs the same loop on
the same state: the run's image RNG, seeded alike everywhere, draws the same images; each process
then takes its share of the batch (`Share`) and samples it, on its own full copy of the model, with
the whole batch's per-prompt keys cut to its share (`Share.keys`, keys.prompt_keys), so it writes
the questions and answers one process would. Curation shares out its pool of images the same way.
What one process computes over the whole batch is computed over the shares and combined:

- Shares. Of a batch of n prompts, process r of W takes prompts r, r + W, r + 2W, ...: whole
  groups (a prompt's G samples, a question's m votes), so silver labels, group advantages and
  group-scope diversity stay local. Strided, not in blocks, so that every run of consecutive
  prompts (a GRPO mini-batch) is spread over all processes.
- Gathers. What needs the whole batch is gathered to every process, in batch order
  (`Share.gather`, small Python objects): the rewards (the advantages, their statistics), the
  episodes and curation records (the logs; random silver labels are drawn from the run's RNG on
  every process), and with --diversity-scope batch the questions (`Share.apply`).
- The GRPO update (grpo.update). Its mini-batches are the whole batch's: consecutive slices of
  the n·G rows (tensor_split), of which each process keeps its own rows (`Share.rows` says where
  they sit), so every process makes the same number of optimizer steps, some perhaps with no row
  of their own. N_seq and N_tok of a mini-batch are summed over processes (`total`) before any
  loss is taken, so a process's loss is its share of the mini-batch's loss, as a micro-batch's is
  (METHOD.md, (21)). After its micro-batches, however many, each process's gradient is summed over
  the processes (`sum_gradients`, once per optimizer step): the sum, not the mean, since the sum
  is then the one-process gradient as it stands. Every process then holds the same gradient, so the
  norm clip uses the global norm and the optimizer steps keep the copies equal. The step's metrics
  are summed over processes, maxima maxed (`sum_metrics`).
- Files. Rank 0 alone writes the run folder (runfolder.py); the others wait for it at the end of
  each phase before reading what it wrote (questions.jsonl, the roles). A checkpoint is the whole
  model and its optimizer, the same in every process, so a run resumes in any world size. Whether
  to stop after a step (Ctrl-C) is asked of every process at once (`any_process`).

Equal up to float rounding, not bitwise: a process's sampler calls and micro-batches hold other
rows than one process's (a row's logits can move in the last bits with its batch), and the
all-reduce adds in its own order.
"""

import atexit
import os
import sys

import torch
import torch.distributed as tdist

import grpo
from data import DataError
from machinery.keys import Keys, prompt_keys


def active():
    """Whether this process is one of several (torchrun, or a test's own process group)."""
    return tdist.is_available() and tdist.is_initialized()


def rank():
    return tdist.get_rank() if active() else 0


def world_size():
    return tdist.get_world_size() if active() else 1


def init(device, smallest_batch):
    """Joins torchrun's process group (it sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous
    address) and returns this process's device: its own GPU, cuda:LOCAL_RANK, or `device` on CPU.
    NCCL between GPUs, gloo on CPU. Ranks other than 0 print nothing on stdout. Refuses more
    processes than the smallest training batch has prompts: each needs one of every batch."""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if processes > smallest_batch:
        raise DataError(f"{processes} processes need --images-per-step and --questions-per-step of {processes} "
                        "or more")
    if processes == 1 or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(close)
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def close(together=False):
    """Leaves the process group; together: once every process has come this far (a run's normal end),
    as one that tears its connections down while another still works can abort in gloo's threads.
    (Not on an error, which may be one process's alone: the others would wait for it forever.)"""
    if active():
        if together:
            tdist.barrier()
        tdist.destroy_process_group()


def _device():
    """Where collectives' tensors live: NCCL reduces on the GPU, gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    if active():
        tdist.barrier()


def any_process(flag):
    """Whether `flag` is true in any process (every process gets the same answer)."""
    if not active():
        return bool(flag)
    value = torch.tensor([float(flag)], device=_device())
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item())


def most(n):
    """The largest of the processes' ints n (every process gets the same answer)."""
    if not active():
        return n
    value = torch.tensor([n], device=_device())
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return int(value.item())


def total(tensor):
    """tensor summed over the processes (a new tensor, on tensor's device)."""
    if not active():
        return tensor
    summed = tensor.to(_device(), copy=True)
    tdist.all_reduce(summed)
    return summed.to(tensor.device)


def on_rank0(write):
    """write() in rank 0 alone, once every process has read what it replaces and before any reads
    what it wrote (the run folder's files)."""
    barrier()
    if rank() == 0:
        write()
    barrier()


def from_rank0(value):
    """Rank 0's value (any picklable object), in every process."""
    if not active():
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(parameters, bucket_values=2**25):
    """Each trainable parameter's gradient summed over the processes, in place. A process with no
    row in this mini-batch has no gradient and adds zeros; a parameter that no process has a
    gradient for keeps none, as in one process (AdamW then leaves it alone). Gradients travel
    flattened in buckets of up to 2^25 values: few calls, 128 MiB (float32) extra memory at most."""
    if not active():
        return
    params = [p for p in parameters if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_device())
    tdist.all_reduce(has_grad, op=tdist.ReduceOp.MAX)
    grads = []
    for p, somewhere in zip(params, has_grad.tolist()):
        if somewhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    buckets, size = [], bucket_values
    for g in grads:
        if size + g.numel() > bucket_values:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel()
    for bucket in buckets:
        flat = torch.cat([g.flatten() for g in bucket])
        tdist.all_reduce(flat)
        for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(summed.view_as(g))


def sum_metrics(metrics):
    """{name: float} of each process -> their sums (names ending in _max: their maximum), the same
    dict in every process. A process may lack names (no row in the mini-batch)."""
    if not active():
        return metrics
    parts = [None] * world_size()
    tdist.all_gather_object(parts, metrics)
    combined = {}
    for part in parts:
        for name, value in part.items():
            combined[name] = value if name not in combined else (
                max(combined[name], value) if name.endswith("_max") else combined[name] + value)
    return combined


class Share:
    """A batch of prompts (`items`, n of them) and this process's share of it: prompts rank,
    rank + W, rank + 2W, ... (`mine`: their items; all of them in one process). Lists and tensors
    "of the batch" hold `per` values per prompt (its G samples, or their keys), prompt after prompt:
    n * per in all, len(mine) * per in a share."""

    def __init__(self, items, process=None, processes=None):  # another process's share: tests
        self.n, self.size = len(items), world_size() if processes is None else processes
        self.prompts = range(rank() if process is None else process, self.n, self.size)  # positions in the batch
        self.mine = self.take(items)

    def take(self, values, per=1):
        """The whole batch's values (a list or tensor of n * per) -> this share's (len(mine) * per)."""
        index = [p * per + j for p in self.prompts for j in range(per)]
        return values[torch.tensor(index, dtype=torch.long)] if torch.is_tensor(values) else [values[i] for i in index]

    def keys(self, seed, *ids, per=1):
        """This share's sampler keys at a site, Keys of len(mine) * per: the whole batch's n * per
        keys (keys.prompt_keys) cut to the share, so a prompt draws the same numbers in any process."""
        return Keys(self.take(prompt_keys(seed, *ids, n=self.n * per).values, per))

    def rows(self, per):
        """[len(mine) * per] long: where each row of this share sits in the batch's n * per rows."""
        return torch.tensor(self.take(range(self.n * per), per), dtype=torch.long)

    def gather(self, values, per=1):
        """This share's values (a list or tensor of len(mine) * per) -> the whole batch's, in batch
        order, in every process. all_gather_object: for small things, not weights, and tensors on
        the CPU (NCCL's would unpickle a GPU tensor onto its sender's GPU)."""
        if self.size == 1:
            return values
        parts = [None] * self.size
        tdist.all_gather_object(parts, values)
        # prompt p is prompt p // W of process p % W
        chunks = [parts[p % self.size][p // self.size * per:(p // self.size + 1) * per] for p in range(self.n)]
        return torch.cat(chunks) if torch.is_tensor(values) else [x for chunk in chunks for x in chunk]

    def apply(self, f, values, per=1):
        """f, a function of the whole batch's values giving one result per value, applied to every
        process's values -> this share's results (a list)."""
        return self.take(f(self.gather(values, per)), per)


def reduce_for(share, group_size, sharded):
    """grpo.update's grpo.Reduce for a policy trained on this process's share of a batch of groups
    of group_size: counts and metrics summed over the processes, and the gradients too, unless the
    policy is sharded (--fsdp, fsdp.py): its backward passes sum them, and every forward pass
    gathers its weights from all the processes, so each must make as many passes as the most any
    makes."""
    alone = grpo.Reduce()  # what one process does: no passes to add, no gradients to sum
    return grpo.Reduce(positions=lambda n: share.rows(group_size), total=total, sum_metrics=sum_metrics,
                       extra_passes=(lambda model, n: most(n) - n) if sharded else alone.extra_passes,
                       sum_gradients=alone.sum_gradients if sharded else sum_gradients)
