"""A step's prompts as the method sees them: this process's share of the batch, their images, their
random streams at each sampling site, and a way to reach the other processes' values.

The role functions (questioner.py, reasoner.py) take one `Batch` and use only what is here:
`items` and `images` (this process's prompts: image indices, or kept questions, and their decoded
images), `paths` (for the logs), `keys(name, per)` (the random streams of the site `name`,
`per` per prompt: keys.prompt_keys of the whole batch, cut to the share) and `over_batch(f, values,
per)` (f over every process's values, this share's results: the batch-scope diversity penalty).
In one process the share is the whole batch, and every one of these is the plain thing.
"""

from functools import cached_property

from machinery import distributed as dist


class Batch:
    """The prompts `items` of one training step (the site: (iteration, step)), or of curation's pool
    (site (iteration,)), shared among the processes (distributed.Share). images: the run's Images;
    index(item): the image an item is about (default: the item is the image's index)."""

    def __init__(self, items, images, seed, site, index=None, share=None, span=slice(None)):
        self.share = share or dist.Share(items)
        self.seed, self.site, self.span, self._images, self._index = seed, site, span, images, index
        self.items = self.share.mine[span]
        self._where = [item if index is None else index(item) for item in self.items]  # the image of each

    @cached_property
    def images(self):
        """The items' images, decoded when first asked for (a pool is only ever decoded chunk by
        chunk), then kept: the step asks about each several times."""
        return [self._images[i] for i in self._where]

    @cached_property
    def paths(self):
        return [self._images.paths[i] for i in self._where]

    def keys(self, name, per=1):
        """machinery.keys.Keys of len(items) * per: the streams of site `name`, whatever batch,
        chunk or process a prompt lands in."""
        start, stop, _ = self.span.indices(len(self.share.mine))
        return self.share.keys(self.seed, name, *self.site, per=per)[start * per:stop * per]

    def chunks(self, size):
        """This share cut into Batches of at most `size` prompts (their images decoded one chunk at
        a time), with the whole share's keys."""
        return [Batch(None, self._images, self.seed, self.site, self._index, self.share, slice(start, start + size))
                for start in range(0, len(self.share.mine), size)]

    def gather(self, values, per=1):
        """This share's values (per per prompt) -> the whole batch's, in batch order, everywhere."""
        return self.share.gather(values, per)

    def over_batch(self, f, values, per=1):
        """f over the whole batch's values (gathered from every process) -> this share's results."""
        return self.share.apply(f, values, per)
