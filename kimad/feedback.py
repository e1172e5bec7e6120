"""Error feedback: the per-tensor state that makes biased compressors (top-k) converge.

Three modes, state kept per tensor NAME in float32 (created as zeros on first use):

``"ef21"`` (default; Richtarik et al. 2021) -- each rank keeps a local estimate ``h`` of its own
    gradient and sends a compressed correction of ``v = g - h``; ``h += C(v)``. Every rank also
    keeps the global estimate ``H`` (identical on all ranks) and adds the aggregated correction
    ``c`` to it: ``H += c``. The optimizer sees ``H``.
``"ef"`` (classic error feedback, Seide et al. 2014) -- each rank keeps the residual ``e`` of what
    it did not send: ``v = g + e``, sends ``C(v)``, ``e = v - C(v)``. The optimizer sees ``c``.
``None`` -- no state: ``v = g``; the optimizer sees ``c``.

For a tensor sent dense this step the message is ``v`` itself: EF21 ``h += v``, EF ``e = 0``.
Top-k messages update the local state inside :func:`kimad.ops.topk_encode` (one fused pass); the
message is then what the wire carries (values rounded to bfloat16, :func:`kimad.compressors.topk.wire_values`)
and the state takes the rounding back at the sent positions, so ``C(v)`` above is always what the
receivers decode.
"""

from __future__ import annotations

import torch

from kimad import ops
from kimad.compressors.topk import wire_values
from kimad.errors import KimadError

MODES = ("ef21", "ef", None)


class FeedbackError(KimadError, ValueError):
    """An unknown error-feedback mode or a state that does not fit its tensor."""


class ErrorFeedback:
    """The error-feedback states of one rank, per tensor name.

    Args:
        mode: ``"ef21"``, ``"ef"`` or ``None`` (see the module docstring).
    """

    def __init__(self, mode: str | None = "ef21") -> None:
        if mode not in MODES:
            raise FeedbackError(f"unknown error_feedback {mode!r}; known: {MODES}")
        self.mode = mode
        self.local: dict[str, torch.Tensor] = {}  # h (EF21) or e (EF)
        self.global_estimate: dict[str, torch.Tensor] = {}  # H (EF21 only)
        # where c is summed: float32, the largest tensor's size, kept all zero
        self._scratch: torch.Tensor | None = None
        # The last error profile per name and the state it read, until that tensor's encode reuses its histogram;
        # and per name the profile's native histogram buffer, refilled each step (no allocation after the first).
        self._profiles: dict[str, tuple[ops.TopKProfile, torch.Tensor]] = {}
        self._histograms: dict[str, object] = {}

    def _state(self, store: dict[str, torch.Tensor], name: str, grad: torch.Tensor) -> torch.Tensor:
        state = store.get(name)
        if state is None:
            state = store[name] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        elif state.numel() != grad.numel():
            raise FeedbackError(f"tensor {name!r} has {grad.numel():,} elements but its error-feedback state "
                                f"has {state.numel():,}; was the model changed after training started?")
        return state

    def local_state(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The state :func:`kimad.ops.topk_encode` / ``error_profile`` take (a fresh zero tensor for ``None``)."""
        if self.mode is None:
            return torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        return self._state(self.local, name, grad)

    @property
    def ops_mode(self) -> str:
        """The ``mode`` of the native ops: ``"ef21"`` subtracts the state, ``"ef"`` adds it (zero for ``None``)."""
        return "ef21" if self.mode == "ef21" else "ef"

    def correct(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``v``: ``g - h`` (EF21), ``g + e`` (EF) or ``g`` (None), as a new float32 tensor of ``grad``'s shape."""
        g = grad.detach().to(torch.float32)
        if self.mode is None:
            return g.contiguous().clone()
        state = self._state(self.local, name, grad).view(g.shape)
        # One pass into a new tensor (not a copy and then an in-place update).
        return (torch.sub(g, state) if self.mode == "ef21" else torch.add(g, state)).contiguous()

    def sent_dense(self, name: str, v: torch.Tensor) -> None:
        """Record that ``v`` (from :meth:`correct`) was sent uncompressed: EF21 ``h += v``; EF ``e = 0``."""
        self._profiles.pop(name, None)
        if self.mode == "ef21":
            self._state(self.local, name, v).view_as(v).add_(v)
        elif self.mode == "ef":
            self._state(self.local, name, v).zero_()

    def estimate(self, name: str, aggregate: torch.Tensor) -> torch.Tensor:
        """What the optimizer sees given this step's aggregated message ``c`` (float32): EF21 ``H += c`` and a
        copy of ``H``; otherwise ``c`` itself."""
        if self.mode != "ef21":
            return aggregate
        estimate = self._state(self.global_estimate, name, aggregate)
        estimate.view_as(aggregate).add_(aggregate)
        return estimate.clone().view_as(aggregate)

    def estimate_topk(self, name: str, messages: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """:meth:`estimate` of ``c = scale * (sum of the ranks' top-k messages)``, given as ``(values, indices)``
        pairs in rank order for a tensor shaped like ``like``; a new float32 tensor of ``like``'s shape.

        EF21 adds ``c`` to ``H`` where the messages name an element only, each element's ``c`` summed
        first (``sparse_sum(..., sum_first=True)``): bitwise the same ``H`` as :meth:`estimate` of a
        fresh ``c`` (but an untouched ``-0.0`` stays ``-0.0``), without two passes over all of ``H``.
        (Adding the messages one by one straight into ``H`` rounds differently and measurably changed
        training, so the sum is formed first.)
        """
        if self.mode != "ef21":
            return ops.sparse_sum(torch.empty(like.shape, dtype=torch.float32, device=like.device), messages,
                                  scale=scale, name=name)
        estimate = self._state(self.global_estimate, name, like).view(-1)
        ops.sparse_sum(estimate, messages, scale=scale, sum_first=True, name=name)
        return estimate.clone().view(like.shape)

    def estimate_quantized(self, name: str, payloads: list[torch.Tensor], like: torch.Tensor, scale: float, *,
                           fmt: str, bits: int | None, bucket: int) -> torch.Tensor:
        """:meth:`estimate` of ``c = scale * (sum of the ranks' QSGD or sign messages)``, given as payloads
        (:mod:`kimad.compressors.quant` layout, ``bits`` and ``bucket`` as sent) in rank order, decoded
        with :func:`kimad.ops.quant_decode_accumulate`; a new float32 tensor of ``like``'s shape.
        EF21 sums ``c`` in the reused buffer and then ``H += c``: bitwise :meth:`estimate` of that ``c``.
        """
        n = like.numel()
        if self.mode != "ef21":
            c = torch.zeros(n, dtype=torch.float32, device=like.device)
            for payload in payloads:
                ops.quant_decode_accumulate(c, payload, fmt=fmt, numel=n, bits=bits, bucket=bucket, scale=scale,
                                            name=name)
            return c.view(like.shape)
        c = self._buffer(like).zero_()
        for payload in payloads:
            ops.quant_decode_accumulate(c, payload, fmt=fmt, numel=n, bits=bits, bucket=bucket, scale=scale,
                                        name=name)
        estimate = self._state(self.global_estimate, name, like).view(-1)
        estimate.add_(c)
        return estimate.clone().view(like.shape)

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        """The first ``like.numel()`` entries of the reused float32 buffer, uninitialised (callers overwrite or
        zero it first, so a decode that failed half-way leaves nothing behind for the next one)."""
        n = like.numel()
        if self._scratch is None or self._scratch.numel() < n or self._scratch.device != like.device:
            self._scratch = torch.empty(n, dtype=torch.float32, device=like.device)
        return self._scratch[:n]

    def state_dict(self) -> dict:
        """Copies of every state tensor, per name."""
        return {"mode": self.mode, "local": {k: v.clone() for k, v in self.local.items()},
                "global_estimate": {k: v.clone() for k, v in self.global_estimate.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (its mode must match this object's)."""
        if state["mode"] != self.mode:
            raise FeedbackError(f"checkpoint holds error_feedback={state['mode']!r} state, this run uses {self.mode!r}")
        self._profiles.clear()
        self.local = {k: v.clone().to(torch.float32) for k, v in state["local"].items()}
        self.global_estimate = {k: v.clone().to(torch.float32) for k, v in state["global_estimate"].items()}

    def encode_quantized(self, name: str, grad: torch.Tensor, fmt: str, *, bits: int | None, bucket: int,
                         seed: int) -> ops.QuantMessage:
        """QSGD (``bits`` 8, 4, 2; draws keyed by ``seed``) or scaled-sign message of ``v`` with the local state
        updated in place (:func:`kimad.ops.qsgd_encode` / :func:`kimad.ops.sign_encode`)."""
        self._profiles.pop(name, None)
        state = self.local_state(name, grad)
        if fmt == "sign":
            return ops.sign_encode(grad, state, bucket=bucket, mode=self.ops_mode, name=name)
        return ops.qsgd_encode(grad, state, bits=bits, bucket=bucket, seed=seed, mode=self.ops_mode, name=name)

    def quant_profile(self, name: str, grad: torch.Tensor, bucket: int) -> ops.QuantErrorEstimate:
        """Expected QSGD errors (bits 8, 4, 2) and the sign error of ``v`` (:func:`kimad.ops.quant_error_estimate`);
        the state is unchanged."""
        return ops.quant_error_estimate(grad, self.local_state(name, grad), bucket=bucket, mode=self.ops_mode,
                                        name=name)

    def encode_topk(self, name: str, grad: torch.Tensor, k: int) -> ops.TopKMessage:
        """Top-k message of ``v`` with the local state updated in place (:func:`kimad.ops.topk_encode`), its
        values as the wire sends them (:func:`kimad.compressors.topk.wire_values`; the state keeps the rounding).
        When :meth:`error_profile` last profiled this very ``grad`` and nothing changed since, the encode
        reuses that profile's histogram (one pass over the data fewer)."""
        profile, state = self._profiles.pop(name, (None, None))
        if profile is None or not profile.describes(grad, state, self.ops_mode):
            profile, state = None, self.local_state(name, grad)
        msg = ops.topk_encode(grad, state, k, mode=self.ops_mode, name=name, profile=profile)
        # The wire rounds the values (bfloat16): the state takes what rounding drops, where it was sent. EF21
        # h = h + values becomes h + sent; EF's e (zero where sent) becomes values - sent. Without feedback the
        # rounding is lost (it is counted in the error).
        sent = wire_values(msg.values)
        dropped = msg.values - sent
        if self.mode is not None:
            flat = state.view(-1)
            if self.mode == "ef21":
                flat.index_add_(0, msg.indices.long(), dropped, alpha=-1.0)
            else:
                flat.index_add_(0, msg.indices.long(), dropped)
        sq_error = msg.sq_error + float(dropped.double().square().sum()) if k else msg.sq_error
        return ops.TopKMessage(values=sent, indices=msg.indices, sq_norm=msg.sq_norm, sq_error=sq_error)

    def error_profile(self, name: str, grad: torch.Tensor, ks: list[int]) -> tuple[list[float], float]:
        """``(errors, sq_norm)`` of ``v`` for each k (:func:`kimad.ops.topk_profile`); the state is unchanged.
        The profile is kept for this tensor's next :meth:`encode_topk`; its histogram buffer (256 KiB per
        tensor of >= 4096 elements; (1 + threads) x that for one split across threads) is kept per name and reused."""
        state = self.local_state(name, grad)
        profile = ops.topk_profile(grad, state, ks, mode=self.ops_mode, name=name, buffer=self._histograms.get(name))
        if profile.buffer is not None:
            self._histograms[name] = profile.buffer
        if profile.nbytes:
            self._profiles[name] = (profile, state)
        else:
            self._profiles.pop(name, None)
        return profile.errors, profile.sq_norm
