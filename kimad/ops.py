"""Typed, validating Python entry points of Kimad's native kernels (``kimad._C``).

One function per native op. Each checks what a user can get wrong (dtype, device, shape) and
raises a :class:`~kimad.errors.KimadError` naming the tensor, converts what it safely can
(non-contiguous views are copied), and then calls the kernel. Kernels themselves hold no policy.
"""

from __future__ import annotations

import torch

from kimad._native import native
from kimad.errors import CorruptMessageError, KimadError


def sparse_accumulate(
    out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float = 1.0,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode one sparse message into a dense tensor: ``out.view(-1)[indices] += scale * values``.

    Duplicate indices add up (unlike ``index_put_``). Every index is checked before anything is
    written, so a corrupt message leaves ``out`` unchanged.

    Args:
        out: float32 tensor of any shape, contiguous, updated in place (as a flat vector of
            ``out.numel()`` elements).
        values: 1-D float32 tensor of ``m`` values (other float dtypes are converted).
        indices: 1-D int32 or int64 tensor of ``m`` flat positions in ``[0, out.numel())``.
        scale: multiplier applied to every value (e.g. ``1 / world_size`` to average).
        name: the tensor's name, used in error messages.

    Returns:
        ``out``.

    Raises:
        KimadError: wrong dtype, device or shape.
        CorruptMessageError: an index lies outside ``[0, out.numel())``; ``out`` is unchanged.
    """
    if not isinstance(out, torch.Tensor) or not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise KimadError(f"sparse_accumulate for {name!r}: out, values and indices must be torch tensors")
    if out.dtype != torch.float32:
        raise KimadError(f"sparse_accumulate for {name!r}: out must be float32, got {out.dtype}")
    if not out.is_contiguous():
        raise KimadError(f"sparse_accumulate for {name!r}: out must be contiguous (it is updated in place)")
    if values.dim() != 1 or indices.dim() != 1:
        raise KimadError(
            f"sparse_accumulate for {name!r}: values and indices must be 1-D, got shapes "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if values.numel() != indices.numel():
        raise CorruptMessageError(
            f"message for {name!r} has {values.numel():,} values but {indices.numel():,} indices"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise KimadError(f"sparse_accumulate for {name!r}: indices must be int32 or int64, got {indices.dtype}")
    if not values.is_floating_point():
        raise KimadError(f"sparse_accumulate for {name!r}: values must be floating point, got {values.dtype}")
    if values.device != out.device or indices.device != out.device:
        raise KimadError(
            f"sparse_accumulate for {name!r}: out ({out.device}), values ({values.device}) and "
            f"indices ({indices.device}) must be on one device"
        )
    if out.numel() > torch.iinfo(torch.int32).max:
        raise KimadError(f"sparse_accumulate for {name!r}: {out.numel():,} elements exceed int32 indexing")
    if indices.dtype == torch.int64:
        bad = (indices < 0) | (indices >= out.numel())
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise CorruptMessageError(
                f"message for {name!r} has index {int(indices[pos]):,} at position {pos:,}; "
                f"the tensor has {out.numel():,} elements"
            )
        indices = indices.to(torch.int32)
    values = values.to(torch.float32).contiguous()
    indices = indices.contiguous()
    bad_pos = native().sparse_accumulate(out, values, indices, float(scale))
    if bad_pos >= 0:
        raise CorruptMessageError(
            f"message for {name!r} has index {int(indices[bad_pos]):,} at position {bad_pos:,}; "
            f"the tensor has {out.numel():,} elements"
        )
    return out
