"""64k-token sequences with extreme gates and packed documents stay finite (issue 8's numerics promise)."""

from __future__ import annotations

import pytest
import torch
import xdistill_kernels as xk

S = 65536


def _inputs(device, dtype, dh=8, nh=1):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, nh, S, dh, generator=g).softmax(-1).to(device, dtype).requires_grad_()
               for _ in range(3))
    igate = (torch.rand(1, nh, S, generator=g) * 60 - 30).to(device).requires_grad_()  # -30 .. 30
    fgate = (torch.rand(1, nh, S, generator=g) * 60 - 30).to(device).requires_grad_()
    # documents of very different lengths, including one-token documents
    starts = torch.tensor([0, 1, 2, 100, 40000, 65535])
    segment_ids = torch.zeros(1, S, dtype=torch.int64)
    segment_ids[0, starts] = 1
    return q, k, v, igate, fgate, segment_ids.cumsum(-1).to(device)


def _check_finite(backend, device, dtype, dh):
    q, k, v, igate, fgate, seg = _inputs(device, dtype, dh)
    h, (c, n, m) = xk.mlstm(q, k, v, igate, fgate, segment_ids=seg, return_final_state=True, backend=backend)
    (h.float().sum() + c.sum()).backward()
    for name, t in {"h": h, "C": c, "n": n, "m": m, "dq": q.grad, "dk": k.grad, "dv": v.grad, "di": igate.grad,
                    "df": fgate.grad}.items():
        assert torch.isfinite(t).all(), name


def test_64k_reference_is_finite():
    _check_finite("chunkwise", "cpu", torch.float32, dh=8)  # small head dim: the CPU reference is slow


@pytest.mark.gpu
def test_64k_triton_is_finite():
    _check_finite("triton", "cuda", torch.bfloat16, dh=64)  # the Triton kernels take powers of two >= 16
