"""Common random numbers for held-out evaluation: the response to held-out prompt ``i`` is
drawn from a noise stream fixed by ``(eval_seed, i, k)`` alone (``k``: the prompt's sample,
``rollout.eval_samples``), so every method, the reference and the SFT policy answer a prompt
with the same random numbers, whatever the batch, the process count or the global RNG (which
it never touches). Two policies' evaluations are then paired draws: their difference carries
far less sampling noise than two independent evaluations (docs/evaluation.md).

With ``generate`` the sampler is the Gumbel-max trick, exact: ``argmax_v f(z)_v + G_v`` with
``G_v`` i.i.d. standard Gumbel is a draw from ``softmax(f(z))``, ``f`` the sampler's own
transform of the logits (temperature, top-k, top-p:
:class:`~dvpo_lightning.ops.sampling.LogitTransform`). Row ``r`` draws its ``V`` Gumbels of each
step from its own generator seeded by :func:`stream_seeds`. With vLLM the stream's seed is the
request's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dvpo_lightning.ops.sampling import LogitTransform, transform_logits


def stream_seeds(eval_seed: int, index: Sequence[int] | Tensor, samples: int = 1) -> list[int]:
    """63-bit stream seeds, ``samples`` per held-out item (item ``r``'s consecutive): sample
    ``k`` of item ``i`` gets a hash of ``(eval_seed, i, k)`` alone (NumPy's ``SeedSequence``:
    well mixed, nearby indices give unrelated streams)."""
    out = []
    for i in (index.tolist() if isinstance(index, Tensor) else index):
        for k in range(samples):
            words = np.random.SeedSequence([eval_seed, int(i), k]).generate_state(2, np.uint32)
            out.append((int(words[0]) >> 1) << 32 | int(words[1]))
    return out


class GumbelMax:
    """A Hugging Face logits processor for greedy ``generate`` that makes greedy decoding an
    exact sample of ``softmax(transform(z))`` with row ``r``'s noise from ``seeds[r]``: it
    returns ``transform(z) + G`` (``−∞`` stays ``−∞``), whose arg-max is the sampled token.

    Args:
        transform: the sampler's transform (min-tokens excluded: ``generate``'s own
            processor applies it first); None: the model's own softmax.
        seeds: one stream seed per row (:func:`stream_seeds`).
        device: where the logits are (each row's generator lives there).
    """

    def __init__(self, transform: LogitTransform | None, seeds: Sequence[int],
                 device: torch.device) -> None:
        self.transform = transform
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def gumbel(self, vocab: int, device: torch.device) -> Tensor:
        """``(B, vocab)`` float32: one step's standard Gumbel noise, row ``r`` from its stream."""
        u = torch.stack([torch.rand(vocab, generator=g, device=device)
                         for g in self.generators])
        return -torch.log(-torch.log(u))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        z = scores.float().clone()
        if self.transform is not None:
            z = transform_logits(z, self.transform)
        return z + self.gumbel(z.shape[-1], z.device)
