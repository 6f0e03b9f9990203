"""The machinery: what makes the method run fast, on many processes, from a run folder and a
command line, and none of it the method. The method files at the repo root (rewards, grpo,
sampler, questioner, reasoner) import nothing from here; the commands (selfplay.py, evaluate.py)
hand them what they need from here (a reduction over processes, a decoder, a batch's share and
random streams) as plain arguments.

    distributed.py       torchrun's processes: shares of a batch, gathers, sums
    fsdp.py              --fsdp: the role in training sharded over the processes (FSDP2)
    keys.py              a random stream per prompt, whatever batch or process it is sampled in
    batch.py             a step's prompts as the method sees them: this process's share, their keys
    fast_decode.py       the sampler's CUDA-graph decoder
    cpu_decode.py        the sampler's CPU decoder: a cache grown in place, stopped rows dropped
    vision_attention.py  the vision tower's windowed attention, one call per layer
    lora.py              LoRA adapters
    policies.py          the roles' weights: the role in training (AdamW, a GRPO step, checkpoints), frozen ones
    runfolder.py         the run folder: state, atomic files, resume, Ctrl-C
    integrity.py         what the run folder checks before it trusts itself: one writer, JSON lines, digests
    cli.py               command lines and presets from a config dataclass; progress bars
"""
