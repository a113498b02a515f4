"""Per-chunk log-softmax pieces of the fused linear loss, in PyTorch (every device).

A chunk is C rows of raw logits ``x = hidden_chunk @ weight.T (+ bias)`` with their target
ids. With ``z = x / temperature``:

* ``logp_lse``: ``lse = logsumexp(z)`` and ``logp = z[target] - lse`` per row, float32
  (float64 for float64 logits);
* ``grad_logits_``: the gradient with respect to ``x`` of ``sum_r g_r logp_r``, that is
  ``g_r (onehot(target_r) - softmax(z_r)) / temperature``, written over the chunk's own
  buffer so that no second C x V tensor is allocated.

``logp_lse`` only reads ``x``, so one pass can reuse the chunk for the gradient;
``grad_logits_`` consumes it: a float32/float64 chunk is overwritten in place (the caller
computed it for this call only), a reduced-precision one is upcast into a new buffer first.

``triton_chunks.py`` has the same two functions as Triton kernels (CUDA tensors, or CPU
tensors under Triton's interpreter).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the log-softmax is computed in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_logits(x: Tensor, temperature: float, inplace: bool) -> Tensor:
    """``x / temperature`` in the accumulation dtype; in ``x``'s buffer when ``inplace`` and
    it has that dtype (else a new one, or ``x`` itself when there is nothing to do)."""
    z = x.to(acc_dtype(x.dtype))
    if temperature != 1.0:
        z = z.div_(temperature) if inplace or z is not x else z / temperature
    return z


def logp_lse(x: Tensor, targets: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """(logp [C], lse [C]) of raw logits ``x`` [C, V] and ``targets`` [C] (valid ids)."""
    z = scaled_logits(x, temperature, inplace=False)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    return logp, lse


def grad_logits_(x: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float) -> Tensor:
    """``g (onehot - softmax(x / temperature)) / temperature`` [C, V] in the accumulation dtype.

    ``lse`` is the one ``logp_lse`` returned for the same rows; ``g`` [C] is dL/dlogp.
    """
    z = scaled_logits(x, temperature, inplace=True)
    p = z.sub_(lse[:, None]).exp_()  # softmax, in z's buffer
    gt = (g / temperature).to(p.dtype)
    p.mul_(-gt[:, None])
    p.scatter_add_(1, targets[:, None], gt[:, None])
    return p
