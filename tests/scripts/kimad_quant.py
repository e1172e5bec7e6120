"""Run under horovodrun: QSGD and scaled-sign plans in the Kimad plugin, checked against a plain decode.

For each configuration (compressors, error feedback, budget) a small MLP trains a few steps with
``hvd.DistributedOptimizer(compression=kimad.Kimad(...))`` at a fixed link model. Every rank records
the message its error feedback encoded for each tensor the plan sent by QSGD or sign, and the
states before the step; the ranks allgather those messages and every rank checks, per such tensor:

* the gradient the optimizer sees equals ``H + c`` (EF21) or ``c`` (EF / none), where ``c`` is
  ``1 / size`` times the sum of every rank's message decoded by :func:`decode_plainly` below;
* its own error-feedback state moved as for top-k: EF21 ``h += Q(v)``, EF ``e = v - Q(v)``;
* every gradient is finite, and each message has exactly ``wire.message_bytes`` bytes.

    python kimad_quant.py
"""

import sys

import horovod.torch as hvd
import numpy as np
import torch
from torch import nn

import kimad
from kimad.compressors.wire import DEFAULT_BUCKET, MessageFormat, message_bytes

# (compressors, error feedback, budget_s, the quantised options the plans must use)
CONFIGS = [
    (("qsgd",), "ef21", 1e-6, {"qsgd2"}),  # nothing fits: every large tensor takes its cheapest option
    (("qsgd",), "ef", 8e-5, None),  # a budget that 8- or 4-bit options fit, not dense
    (("sign",), "ef21", 1e-6, {"sign"}),
    (("sign",), None, 1e-6, {"sign"}),
    (("topk", "qsgd", "sign"), "ef21", 8e-5, None),  # a mixed plan: whatever the allocator picks
]


def decode_plainly(payload: np.ndarray, n: int, fmt: str, bits: int | None) -> np.ndarray:
    """A QSGD or sign message (kimad.compressors.quant layout) decoded element by element, float64."""
    assert int.from_bytes(payload[:4].tobytes(), "little") == n
    buckets = -(-n // DEFAULT_BUCKET)
    scales = payload[8: 8 + 4 * buckets].view(np.float32).astype(np.float64)
    code_bits = 1 if fmt == "sign" else bits
    stream = np.unpackbits(payload[8 + 4 * buckets:], bitorder="little")
    out = np.empty(n)
    for i in range(n):
        code = sum(int(stream[i * code_bits + j]) << j for j in range(code_bits))
        scale = scales[i // DEFAULT_BUCKET]
        if fmt == "sign":
            out[i] = -scale if code else scale
        else:
            levels = 2 ** (bits - 1) - 1
            level, negative = code & levels, code >> (bits - 1)
            out[i] = (-1.0 if negative else 1.0) * level * (scale / levels)
    return out


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def check(config, rank: int, size: int) -> set[str]:
    compressors, feedback, budget_s, must_use = config
    net = model()
    comp = kimad.Kimad(net.named_parameters(), budget_s=budget_s, bandwidth_bps=1e9, latency_s=1e-6,
                       compressors=compressors, error_feedback=feedback, densities=(0.3, 0.05))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), named_parameters=net.named_parameters(),
                                   compression=comp)
    fb = comp._feedback
    sent: dict[str, torch.Tensor] = {}
    encode = fb.encode_quantized

    def recording_encode(name, grad, fmt, **kw):
        message = encode(name, grad, fmt, **kw)
        sent[name] = message.payload.clone()
        return message

    fb.encode_quantized = recording_encode
    used: set[str] = set()
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        opt.zero_grad()
        net(torch.randn(16, 32, generator=g)).pow(2).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        local = {n: s.clone() for n, s in fb.local.items()}
        global_estimate = {n: s.clone() for n, s in fb.global_estimate.items()}
        sent.clear()
        opt.synchronize()
        tensors = comp.metrics["tensors"]
        quantized = sorted(n for n, t in tensors.items() if t["option"].startswith(("qsgd", "sign")))
        used |= {t["option"] for t in tensors.values()}
        assert set(sent) == set(quantized), (sorted(sent), quantized)
        everyone = hvd.allgather_object({n: sent[n].numpy() for n in quantized}, name=f"quant.check.{step}")
        for name, p in net.named_parameters():
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
            if name not in quantized:
                continue
            option = tensors[name]["option"]
            fmt = "sign" if option == "sign" else "qsgd"
            bits = None if fmt == "sign" else int(option[4:])
            n = p.numel()
            wire = message_bytes(MessageFormat(fmt), n, bits=bits)
            assert tensors[name]["bytes"] == wire and all(m[name].size == wire for m in everyone)
            decoded = [decode_plainly(m[name], n, fmt, bits) for m in everyone]
            c = sum(decoded) / size
            expected = c + (global_estimate.get(name, torch.zeros(p.shape)).view(-1).double().numpy()
                            if feedback == "ef21" else 0.0)
            got = p.grad.view(-1).double().numpy()
            assert np.allclose(got, expected, rtol=1e-5, atol=1e-7), \
                f"{name} ({option}): aggregate differs by {np.abs(got - expected).max():.3g}"
            mine = decoded[rank]
            old = local.get(name, torch.zeros(p.shape)).view(-1).double().numpy()
            v = grads[name].view(-1).double().numpy() + {"ef21": -old, "ef": old, None: 0.0}[feedback]
            if feedback == "ef21":
                assert np.allclose(fb.local[name].view(-1).numpy(), old + mine, rtol=1e-5, atol=1e-7), name
            elif feedback == "ef":
                assert np.allclose(fb.local[name].view(-1).numpy(), v - mine, rtol=1e-5, atol=1e-6), name
            # The message approximates v: its error is what the metrics report.
            assert np.isclose(((v - mine) ** 2).sum(), tensors[name]["local_error"], rtol=1e-3, atol=1e-9), name
        with opt.skip_synchronize():
            opt.step()
    if must_use is not None:
        assert must_use <= used, (must_use, used)
    assert any(o.startswith(("qsgd", "sign")) for o in used), used
    return used


def main() -> int:
    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    for config in CONFIGS:
        used = check(config, rank, size)
        print(f"kimad quant: rank {rank} {config[:3]} OK, options {sorted(used)}", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
