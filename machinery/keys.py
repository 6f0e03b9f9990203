"""A random stream per prompt: what makes a run's samples independent of how its prompts are cut
into sampler calls (the KV-cache budget) or shared out among processes (the world size).

Nothing is drawn from a generator that the calls consume in turn. Instead the caller gives each
prompt a key (`prompt_keys(seed, *ids, n)`: a hash of the run's seed, of ids naming the call site
such as phase and step, and of the prompt's index in the whole batch), and the uniform of sample j
of that prompt at decode step t is a pure function of (key, j, t) (`Keys.uniforms`), computed by a
counter-based hash: splitmix64's mixer in int64 tensor ops. So a prompt draws the same numbers
whichever call, batch position or process it lands in, and its n samples, each with its own j,
draw independent numbers from the first token on.

Splitmix64 (Steele, Lea and Flood 2014, with Vigna's constants): its output number c (0, 1, ...)
from seed h is mix64(h + (c + 1) * GOLDEN); mix64 is a bijection of 64-bit words whose every output
bit depends on every input bit. Torch's int64 products and sums wrap around modulo 2^64, as the
algorithm needs; its >> copies the sign bit, so a mask makes it the logical shift the algorithm
means. The constants are written as the int64 of their bits.
"""

import hashlib

import torch


def _int64(x):
    """A Python int -> the int64 with the same low 64 bits."""
    return (int(x) + 2**63) % 2**64 - 2**63


GOLDEN, MIX1, MIX2 = (_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
KEY_BITS = (1 << 63) - 1  # keys are kept non-negative: 63 bits


def shift_right(x, s):
    """Logical right shift of an int64 tensor by s (1..63): torch's >> is arithmetic, so mask the sign copies."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x):
    """splitmix64's mixer: int64 tensor [...] -> [...], a bijection of 64-bit words."""
    x = (x ^ shift_right(x, 30)) * MIX1
    x = (x ^ shift_right(x, 27)) * MIX2
    return x ^ shift_right(x, 31)


def fold(h, c):
    """Output number c of the splitmix64 stream seeded h: int64 tensors h, c (broadcast) -> int64."""
    return mix64(h + (c + 1) * GOLDEN)


class Keys:
    """The keys of a batch of prompts, one 63-bit int64 each (`values`: [B]). The sampler takes a
    prompt's rows with `keys[rows]` and its random numbers with `keys.uniforms(n, steps)`."""

    def __init__(self, values):
        self.values = values

    def __len__(self):
        return len(self.values)

    def __getitem__(self, rows):
        """The keys of some of the prompts: rows a slice, a list or LongTensor of positions, or a mask."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows)
            rows = rows if rows.dtype == torch.bool else rows.long()
        return Keys(self.values[rows])

    def uniforms(self, n, steps, device=None):
        """u [B * n, steps] float64 in [0, 1): u[b * n + j, t] is the uniform of sample j of prompt b
        at decode step t, the top 53 bits of fold(fold(key b, j), t), whatever else is in the call."""
        keys = self.values.to(device)
        streams = fold(keys[:, None], torch.arange(n, device=device)).flatten()  # [B * n]: each sample's seed
        words = fold(streams[:, None], torch.arange(steps, device=device))  # [B * n, steps]
        return shift_right(words, 11).double() * 2.0**-53


def prompt_keys(seed, *ids, n):
    """The keys of prompts 0..n-1 of one sampling site -> Keys of n.

    seed: the run's seed; ids: ints or strings naming the site (e.g. phase, iteration, step), so that
    each site draws its own numbers. The seed is folded with each id in turn, then with the prompt's
    index: key i = fold(fold(fold(seed, id1), id2)..., i) & KEY_BITS. Key i does not depend on n, so
    a process holding prompts a..b of a batch uses prompt_keys(seed, *ids, n=B)[a:b].
    Strings enter as the first 8 bytes of their BLAKE2b digest (stable across processes, unlike hash()).
    """
    h = torch.tensor(_int64(seed))
    for i in ids:
        i = int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") if isinstance(i, str) else i
        h = fold(h, torch.tensor(_int64(i)))
    return Keys(fold(h, torch.arange(n)) & KEY_BITS)
