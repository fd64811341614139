"""Fused mixer ops (feature map, gate activations, output mix) against the mixer's plain torch forms.

Outputs and every gradient of each op, then a whole HybridMixer forward + backward, and a whole student's
prefill + decoding, with ``pointwise_backend="triton"`` against ``"torch"``. On CPU the kernels run in the
Triton interpreter (the conftest sets TRITON_INTERPRET) in float32 at small odd sizes; the metric is the
relative L2 error, which float32 rounding puts near 1e-7 (measured: <= 2.5e-7 for the ops, <= 1.1e-6 through
the whole mixer, whose mLSTM amplifies it), so 1e-5 flags any wrong term while leaving room for rounding.
bf16 cannot be checked on CPU (the Triton 3.9 interpreter's bf16 tl.dot returns garbage); GPU tests (marked)
run SmolLM2-135M's head layout in bf16, their tolerance is explained there.
"""

import pytest
import torch
from xdistill_kernels import feature_map, gate_activations, gate_mix

from lit_xdistill.models.configuration_xdistill import XDistillConfig
from lit_xdistill.models.mixer import FeatureMap, HybridMixer, MixerContext, _softcap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream)


# -- feature map ---------------------------------------------------------------------------------------------
# (B, NX input heads, NH heads, S, D, feature dim, kind). S = 150 spans three 64-row blocks, which the weight
# gradient's row splits cover unevenly (one split has a block past S); D = 24 and F = 12 need padded tiles.
PHI_CASES = [
    (2, 1, 3, 37, 16, 16, "softmax_pm"),
    (1, 1, 3, 150, 32, 32, "softmax_pm"),
    (3, 3, 3, 29, 24, 12, "softmax"),
    (1, 2, 4, 70, 24, 24, "softmax_pm"),
]


@pytest.mark.parametrize("B,NX,NH,S,D,feat,kind", PHI_CASES)
def test_feature_map_matches_torch(B, NX, NH, S, D, feat, kind):
    torch.manual_seed(0)
    phi = FeatureMap(NH, D, feat, kind).to(DEVICE)
    with torch.no_grad():
        phi.weight.mul_(3.0)  # sharper softmaxes than the init, so that every term of the backward matters
    # (B, S, NX, D) memory seen as (B, NX, S, D), the layout the attention module hands over
    x = torch.randn(B, S, NX, D, device=DEVICE).transpose(1, 2).requires_grad_()
    out, ref = phi(x, fused=True), phi(x)
    assert out.shape == ref.shape == (B, NH, S, feat) and out.is_contiguous()
    upstream = torch.randn_like(ref)
    errors = {"phi": _rel(out, ref)}
    for name, a, b in zip(["dx", "dW"], _grads(out, (x, phi.weight), upstream),
                          _grads(ref, (x, phi.weight), upstream)):
        errors[name] = _rel(a, b)
    assert max(errors.values()) < TOL, errors


def test_feature_map_rejects_bad_shapes():
    with pytest.raises(ValueError, match="NX | NH"):
        feature_map(torch.zeros(1, 2, 4, 16), torch.zeros(3, 16, 8))


# -- gates -----------------------------------------------------------------------------------------------------
def _gates_torch(g, nh, cap):
    g = g.float().transpose(1, 2)
    o = torch.sigmoid(g[:, 2 * nh :]) if g.shape[1] == 3 * nh else None
    return _softcap(g[:, :nh], cap), _softcap(g[:, nh : 2 * nh], cap), o


@pytest.mark.parametrize("groups,cap", [(3, 15.0), (2, 15.0), (3, 0.0)])
def test_gate_activations_match_torch(groups, cap):
    torch.manual_seed(0)
    B, S, NH = 3, 41, 5
    g = (torch.randn(B, S, groups * NH, device=DEVICE) * 20).requires_grad_()  # reaches into the soft cap
    out, ref = gate_activations(g, NH, cap), _gates_torch(g, NH, cap)
    assert (out[2] is None) == (groups == 2)
    out, ref = [t for t in out if t is not None], [t for t in ref if t is not None]
    errors = {f"out{i}": _rel(a, b) for i, (a, b) in enumerate(zip(out, ref))}
    assert all(t.shape == (B, NH, S) and t.dtype == torch.float32 and t.is_contiguous() for t in out)
    upstream = [torch.randn_like(t) for t in ref]
    errors["dg"] = _rel(_grads(out, g, upstream)[0], _grads(ref, g, upstream)[0])
    assert max(errors.values()) < TOL, errors


# -- output mix ------------------------------------------------------------------------------------------------
def test_gate_mix_matches_torch():
    torch.manual_seed(0)
    B, NH, S, D = 2, 3, 29, 20
    o = torch.rand(B, NH, S, device=DEVICE).requires_grad_()
    h = torch.randn(B, NH, S, D, device=DEVICE).requires_grad_()
    swa = torch.randn(B, S, NH, D, device=DEVICE).transpose(1, 2).requires_grad_()  # strided like attention's
    out = gate_mix(o, h, swa)
    ref = o[..., None] * h + (1 - o[..., None]) * swa
    assert out.transpose(1, 2).is_contiguous()  # the layout o_proj reads: no copy after the mixer
    upstream = torch.randn(B, S, NH, D, device=DEVICE).transpose(1, 2)
    errors = {"out": _rel(out, ref)}
    for name, a, b in zip(["do", "dh", "dswa"], _grads(out, (o, h, swa), upstream),
                          _grads(ref, (o, h, swa), upstream)):
        errors[name] = _rel(a, b)
    assert max(errors.values()) < TOL, errors


# -- the whole mixer -------------------------------------------------------------------------------------------
def _mixer(kind, mlstm_backend="chunkwise", attention_backend="sdpa", NH=6, D=16, hidden=24):
    config = XDistillConfig(window=8, n_sinks=2, ogate_bias=0.0, mlstm_backend=mlstm_backend,
                            attention_backend=attention_backend)
    mixer = HybridMixer(config, kind, hidden, NH, D, layer_idx=0).to(DEVICE)
    if hasattr(mixer, "gates"):  # (the linear mixer has none)
        with torch.no_grad():  # gate weights start at zero: make every gate depend on x
            mixer.gates.weight.normal_(0.0, 0.5)
    return mixer


def _mixer_inputs(B, NH, NKV, S, D, hidden, dtype=torch.float32, n_docs=3):
    torch.manual_seed(1)
    q = torch.randn(B, NH, S, D, device=DEVICE, dtype=dtype).requires_grad_()
    k = torch.randn(B, NKV, S, D, device=DEVICE, dtype=dtype).requires_grad_()
    v = torch.randn(B, NKV, S, D, device=DEVICE, dtype=dtype).requires_grad_()
    x = torch.randn(B, S, hidden, device=DEVICE).requires_grad_()
    seg = (torch.arange(S, device=DEVICE) * n_docs // S).expand(B, S).contiguous()  # packed documents
    return (q, k, v, x), seg


def _run_mixer(mixer, backend, inputs, seg, upstream, autocast=False):
    mixer.pointwise_backend = backend
    mixer.zero_grad(set_to_none=True)
    params = list(mixer.parameters())
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = mixer(*inputs, scaling=None, teacher_window=None, ctx=MixerContext(segment_ids=seg))
    grads = torch.autograd.grad(out, [*inputs, *params], upstream, allow_unused=True)  # linear: x unused
    names = ["out", "dq", "dk", "dv", "dx", *(f"d{n}" for n, _ in mixer.named_parameters())]
    return {name: t for name, t in zip(names, [out, *grads]) if t is not None}


@pytest.mark.parametrize("kind", ["hybrid", "mlstm", "linear"])
def test_mixer_fused_equals_unfused(kind):
    B, NH, NKV, S, D, hidden = 2, 6, 2, 45, 16, 24
    mixer = _mixer(kind, NH=NH, D=D, hidden=hidden)
    inputs, seg = _mixer_inputs(B, NH, NKV, S, D, hidden)
    upstream = torch.randn(B, NH, S, D, device=DEVICE)
    fused = _run_mixer(mixer, "triton", inputs, seg, upstream)
    plain = _run_mixer(mixer, "torch", inputs, seg, upstream)
    assert fused.keys() == plain.keys()
    errors = {name: _rel(fused[name], plain[name]) for name in plain if plain[name].norm() > 0}
    assert max(errors.values()) < TOL, errors


def test_student_fused_prefill_and_decoding():
    """A whole student with the fused ops: the same logits as the torch ops, and prefill + token-by-token
    decoding (fused feature maps, gates and mix on the cached path, with the plain and the static cache)
    equal to one full forward."""
    from tiny_teachers import tiny_teacher

    from lit_xdistill.models import HybridCache, student_from_teacher
    from lit_xdistill.models.decoding import StaticHybridCache

    fused = student_from_teacher(tiny_teacher("llama"), window=8, n_sinks=2, ogate_bias=0.0,
                                 pointwise_backend="triton").to(DEVICE).eval()
    plain = student_from_teacher(tiny_teacher("llama"), window=8, n_sinks=2, ogate_bias=0.0,
                                 pointwise_backend="torch").to(DEVICE).eval()
    # prefill past the window (8), then 4 decoding steps: each step runs every fused op in the Triton interpreter
    x = torch.randint(0, 128, (2, 15), device=DEVICE)
    with torch.no_grad():
        full = fused(x).logits
        cache = HybridCache(batch_size=2)
        parts = [fused(x[:, :11], cache=cache, use_cache=True).logits]
        parts += [fused(x[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(11, 15)]
        static = StaticHybridCache(batch_size=2, cuda_graph=False)
        steps = [fused(x[:, :11], cache=static, use_cache=True).logits]
        steps += [fused(x[:, i : i + 1], cache=static, use_cache=True).logits for i in range(11, 15)]
        reference = plain(x).logits
    assert _rel(full, reference) < TOL
    assert _rel(torch.cat(parts, 1), full) < TOL
    assert _rel(torch.cat(steps, 1), full) < TOL


def test_pointwise_backend_selection():
    mixer = _mixer("hybrid")
    assert mixer.pointwise_backend == "auto"
    assert mixer._fused(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")) == (
        torch.cuda.is_available())
    with pytest.raises(ValueError, match="pointwise_backend"):
        XDistillConfig(pointwise_backend="fused")


# -- GPU --------------------------------------------------------------------------------------------------------
# bf16 at SmolLM2-135M's head layout (9 query heads, 3 KV heads, head dim 64). The fused and the torch forms
# round at different places (the torch feature map rounds x W to bf16 before its fp32 softmax, the fused one
# does not), so they are compared through a float32 run of the torch forms on the same values: the fused
# path's error must be no larger than 1.5x the torch path's (plus 2e-3 for errors near zero). Both sit at a
# few 1e-3 (bf16 roundings, ~2^-9 relative each, adding in quadrature); a wrong term gives O(1).
def _assert_no_less_accurate(fused: dict, plain: dict, truth: dict):
    errors = {name: (_rel(fused[name], truth[name]), _rel(plain[name], truth[name])) for name in truth}
    bad = {name: e for name, e in errors.items() if e[0] > 1.5 * e[1] + 2e-3}
    assert not bad, f"(fused, torch) relative errors against fp32: {bad} (all: {errors})"


def _feature_map_run(phi, x, upstream, fused):
    out = phi(x, fused=fused)
    dx, dw = _grads(out, (x, phi.weight), upstream.to(out.dtype))
    return {"phi": out, "dx": dx, "dW": dw}


def _gates_run(g, nh, upstream, fused):
    out = gate_activations(g, nh, 15.0) if fused else _gates_torch(g, nh, 15.0)
    return {"igate": out[0], "fgate": out[1], "o": out[2], "dg": _grads(out, g, upstream)[0]}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_ops_bf16_gpu():
    torch.manual_seed(0)
    B, NH, NKV, S, D = 2, 9, 3, 1000, 64
    phi = FeatureMap(NH, D, D, "softmax_pm").cuda()
    x = torch.randn(B, S, NKV, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    upstream = torch.randn(B, NH, S, D, device="cuda", dtype=torch.bfloat16)
    x16, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    _assert_no_less_accurate(_feature_map_run(phi, x16, upstream, True), _feature_map_run(phi, x16, upstream, False),
                             _feature_map_run(phi, x32, upstream, False))
    g = (torch.randn(B, S, 3 * NH, device="cuda") * 10).to(torch.bfloat16)
    ups = [torch.randn(B, NH, S, device="cuda") for _ in range(3)]
    g16, g32 = g.clone().requires_grad_(), g.float().requires_grad_()
    _assert_no_less_accurate(_gates_run(g16, NH, ups, True), _gates_run(g16, NH, ups, False),
                             _gates_run(g32, NH, ups, False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixer_fused_equals_unfused_bf16_gpu():
    """The whole hybrid mixer under bf16 autocast, Triton mLSTM and FlexAttention, fused vs torch ops."""
    B, NH, NKV, S, D, hidden = 2, 9, 3, 1000, 64, 576
    mixer = _mixer("hybrid", mlstm_backend="auto", attention_backend="auto", NH=NH, D=D, hidden=hidden)
    with torch.no_grad():
        mixer.gates.weight.mul_(0.1)  # x ~ N(0, 1) over 576 inputs: keep the gate pre-activations O(1)
    inputs, seg = _mixer_inputs(B, NH, NKV, S, D, hidden, dtype=torch.bfloat16, n_docs=4)
    upstream = torch.randn(B, NH, S, D, device="cuda", dtype=torch.bfloat16)
    fused = _run_mixer(mixer, "triton", inputs, seg, upstream, autocast=True)
    plain = _run_mixer(mixer, "torch", inputs, seg, upstream, autocast=True)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    truth = _run_mixer(mixer, "torch", inputs32, seg, upstream.float())
    _assert_no_less_accurate(fused, plain, truth)
