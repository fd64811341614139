"""Random mLSTM inputs shared by the kernel tests (not a test module)."""

import torch


def make_inputs(B, NH, S, DQK, DV, *, dtype=torch.float64, device="cpu", seed=0, gate_scale=1.0,
                with_state=False, n_docs=0):
    """q, k, v, igate, fgate (requires_grad), segment ids (or None) and an initial state (or None).

    Gates: igate ~ N(0,1) * gate_scale, fgate ~ N(3,1) * gate_scale (forget gates near 1 as in trained
    models); q, k scaled by DQK**-0.5 so that q.k is O(1). n_docs > 0 packs that many documents per row
    at random boundaries, plus one-token documents at the end of row 0."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, mean=0.0, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + mean).to(device, dtype)

    q = rnd(B, NH, S, DQK, scale=DQK**-0.5)
    k = rnd(B, NH, S, DQK, scale=DQK**-0.5)
    v = rnd(B, NH, S, DV)
    ig = rnd(B, NH, S, scale=gate_scale)
    fg = rnd(B, NH, S, mean=3.0 * gate_scale, scale=gate_scale)
    tensors = [x.requires_grad_() for x in (q, k, v, ig, fg)]
    seg = None
    if n_docs:
        starts = torch.stack([torch.randperm(S - 1, generator=g)[: n_docs - 1] + 1 for _ in range(B)])
        change = torch.zeros(B, S, dtype=torch.long)
        change.scatter_(1, starts, 1)
        change[0, S - 3:] = 1  # one-token documents at the end of row 0
        seg = (change.cumsum(1) * 7 % 5).to(device)  # ids need not be increasing, only differ at boundaries
    state = None
    if with_state:
        C = rnd(B, NH, DQK, DV, scale=0.5)
        n = rnd(B, NH, DQK, scale=0.5).abs() + 0.1
        m = rnd(B, NH, scale=1.0)
        state = (C.requires_grad_(), n.requires_grad_(), m)
    return tensors, seg, state


def loss_and_grads(fn, tensors, seg, state, seed=1, outputs=("h", "C", "n")):
    """Run fn, reduce the named ``outputs`` among h and the final (C, n) with fixed random weights, return (h,
    final state, grads); grads of leaves that no named output reaches are zeros. fn may return h alone (the
    final state left out: return_final_state=False); the state returned is then None."""
    out = fn(*tensors, segment_ids=seg, initial_state=state)
    h, final = out if isinstance(out, tuple) else (out, None)
    named = dict(zip("hCn", (h, *final[:2]))) if final is not None else {"h": h}
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = {name: torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
         for name, x in named.items()}
    loss = sum((named[name] * w[name]).sum() for name in outputs)
    leaves = list(tensors) + ([state[0], state[1]] if state is not None else [])
    grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
    return h.detach(), (tuple(x.detach() for x in final) if final is not None else None), grads
