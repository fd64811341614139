"""Triton mLSTM kernels against the float64 reference: outputs, final states and every gradient.

On CPU the kernels run in the Triton interpreter (float32, small odd sizes). The metric is the relative
error ||x - ref|| / ||ref||: float32 arithmetic over at most a few hundred accumulations per element lands
near 1e-6 (measured: <= 3e-6), so 5e-5 flags any real mistake (a wrong decay or mask moves it to >1e-2)
while leaving room for rounding. GPU tests (marked) run realistic sizes in bf16; their tolerance is
explained there.

Every launch variant of the Triton path (kernels/chunkwise_triton.py, _config) runs through the same checks:
the split backward (and its restructured dq/dk block), the restructured _fwd_output, _bwd_states' hoisted
dden load, the state kernels cut into segments (with their carry passes), the gate kernel's blocks (carried
across from chunk sums) and the document branch of _fwd_output and _bwd_grads are other compiled code;
pipelining depths, warps and fp32 gates change only how the kernels are scheduled and loaded (the interpreter
ignores them), so on CPU they check the launch plumbing and on a GPU the compiled code.
"""

import contextlib

import pytest
import torch
from mlstm_inputs import loss_and_grads, make_inputs
from xdistill_kernels import mlstm, mlstm_fresh_state, mlstm_step
from xdistill_kernels.chunkwise_triton import _launch_overrides

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _fn(backend, chunk_size=None, return_final_state=True, **options):
    def fn(*args, **kw):
        return mlstm(*args, backend=backend, chunk_size=chunk_size, return_final_state=return_final_state,
                     **options, **kw)

    return fn


def _as_double(tensors, state):
    tensors = [x.detach().double().requires_grad_() for x in tensors]
    if state is not None:
        state = (state[0].detach().double().requires_grad_(), state[1].detach().double().requires_grad_(),
                 state[2].double())
    return tensors, state


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# name -> _launch_overrides arguments; "default" is the configuration mlstm() runs.
VARIANTS = {
    "default": {},
    "pipelined": dict(gates_fp32=True, fwd_states={"NUM_STAGES": 2}, bwd_states={"NUM_STAGES": 3, "num_warps": 8}),
    "split": dict(split_bwd=True, bwd_dqdk={"num_warps": 4}),
    "split_restructured": dict(split_bwd=True, dqdk_restructured=True),
    "output_restructured": dict(output_restructured=True),
    "dden_prefetch": dict(dden_prefetch=True, bwd_states={"NUM_STAGES": 3}),
    # the gate gradients in blocks of 16 positions, so that the carry into a block crosses blocks and documents,
    # summed from loads of two chunk sums each (the count of document starts carried from load to load)
    "gate_blocks": dict(bwd_gates={"BS": 16, "BC": 2}),
    # the state kernels' chunks in 3 segments (fewer where there are fewer chunks), so that the carry passes
    # walk across segments in both directions, one chunk per carry program (several blocks per segment)
    "segments": dict(state_segments=3, carry_block=1),
    # with documents, chunks without a document start through the one-document code of _fwd_output, _bwd_grads
    "doc_branch": dict(doc_branch=True),
}


def _launch(variant):
    return _launch_overrides(**VARIANTS[variant]) if VARIANTS[variant] else contextlib.nullcontext()


def check_against_reference(shape, chunk, *, dtype, tol, with_state, n_docs, gate_scale=1.0, seed=0,
                            state_block=None, variant="default", segment_ids=None):
    """segment_ids (B, S), if given, replace make_inputs' random documents."""
    B, NH, S, DQK, DV = shape
    tensors, seg, state = make_inputs(B, NH, S, DQK, DV, dtype=dtype, device=DEVICE, with_state=with_state,
                                      n_docs=n_docs, gate_scale=gate_scale, seed=seed)
    if segment_ids is not None:
        seg = segment_ids.to(DEVICE)
    if gate_scale > 1:
        with torch.no_grad():
            tensors[3].clamp_(-30, 30)
            tensors[4].clamp_(-30, 30)
    with _launch(variant):  # the backward runs inside too; it reuses the forward's configuration anyway
        out = loss_and_grads(_fn("triton", chunk, state_block=state_block), tensors, seg, state)
    ref = loss_and_grads(_fn("parallel"), *_as_double(tensors, state)[:1], seg, _as_double(tensors, state)[1])
    names = ["h", "C", "n", "m", "dq", "dk", "dv", "digate", "dfgate", "dC0", "dn0"]
    values = [out[0], *out[1], *out[2]]
    refs = [ref[0], *ref[1], *ref[2]]
    errors = {}
    for name, x, r in zip(names, values, refs):
        assert x.shape == r.shape, name
        assert torch.isfinite(x).all(), name
        errors[name] = _rel(x, r) if r.norm() > 0 else x.double().norm().item()
    bad = {k: v for k, v in errors.items() if v > tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


CPU_CASES = [
    # (B, NH, S, DQK, DV), chunk, with_state, n_docs
    ((1, 2, 16, 16, 16), 16, False, 0),  # exactly one chunk
    ((1, 2, 3, 16, 16), None, True, 0),  # three tokens: every kernel's blocks mostly masked
    ((2, 2, 37, 16, 32), 16, True, 0),  # S not a multiple of the chunk, initial state
    ((2, 1, 53, 32, 16), 16, True, 5),  # several documents per row, one-token documents
    ((1, 1, 45, 128, 64), 16, True, 3),  # DQK split into blocks of 64 inside the kernels
    ((1, 1, 20, 64, 128), 32, False, 2),  # DV split, S < chunk
    ((1, 1, 150, 128, 128), 128, True, 2),  # L = 128 at DV = 128: the long-sequence defaults (split backward, ...)
    ((1, 1, 150, 64, 64), 128, True, 2),  # L = 128 at DV = 64: pipelined state kernels, unsplit backward
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,chunk,with_state,n_docs", CPU_CASES)
def test_triton_matches_reference_fp32(shape, chunk, with_state, n_docs, variant):
    check_against_reference(shape, chunk, dtype=torch.float32, tol=5e-5, with_state=with_state, n_docs=n_docs,
                            variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_state_kernels_split_into_small_tiles_fp32(variant):
    """state_block=16 splits each head's 32 x 32 state over four programs of the sequential state kernels
    (forward and backward): documents, an initial state and a ragged last chunk still equal the reference."""
    check_against_reference((2, 1, 45, 32, 32), 16, dtype=torch.float32, tol=5e-5, with_state=True, n_docs=3,
                            state_block=16, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_extreme_gates_fp32(variant):
    """Gate pre-activations in -30..30: finite and still equal to the reference."""
    check_against_reference((1, 2, 40, 16, 16), 16, dtype=torch.float32, tol=5e-5, with_state=True,
                            n_docs=4, gate_scale=10.0, variant=variant)


@pytest.mark.parametrize("variant", ["default", "gate_blocks", "segments", "doc_branch"])
def test_triton_documents_at_chunk_edges_fp32(variant):
    """Document starts where per-chunk bounds are easy to get wrong (chunks of 16): at a chunk's first position
    (16, 48), at its last (31), two in one chunk (40, 44), none in chunks 4-5, and one-token documents at the
    row's end (93, 94); row 1 is one document. Chunks without a start skip the document masks, and blocks of
    the gate scan without one skip its segmented scan, so both paths and their edges meet the reference."""
    S = 95
    starts = torch.zeros(2, S, dtype=torch.long)
    starts[0, [16, 31, 40, 44, 48, 93, 94]] = 1
    check_against_reference((2, 2, S, 16, 16), 16, dtype=torch.float32, tol=5e-5, with_state=True, n_docs=0,
                            variant=variant, segment_ids=starts.cumsum(1))


def test_state_segments_choice(monkeypatch):
    """The automatic segment count of the state kernels: the most segments (<= 8, each >= 4 chunks) that keep
    their programs within two per SM; one on CPU; a requested count is capped by the chunks, and the segment
    length K is what cuts NC into the fewest equal pieces."""
    import xdistill_kernels.chunkwise_triton as ct

    monkeypatch.setattr(ct, "_sm_count", lambda index: 132)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert ct._state_segments(None, 128, 128, cuda) == (2, 64)  # (1, 32, 16384, 128): 256 programs
    assert ct._state_segments(None, 18, 128, cuda) == (8, 16)  # (2, 9, 16384, 64): at most 8 segments
    assert ct._state_segments(None, 72, 32, cuda) == (2, 16)  # (8, 9, 4096, 64)
    assert ct._state_segments(None, 18, 20, cuda) == (4, 5)  # segments of at least 4 chunks
    assert ct._state_segments(None, 300, 128, cuda) == (1, 128)  # the card is full already
    assert ct._state_segments(None, 18, 128, cpu) == (1, 128)
    assert ct._state_segments(3, 1, 4, cpu) == (2, 2)
    assert ct._state_segments(16, 1, 5, cpu) == (5, 1)


def test_triton_fp32_gates_change_nothing():
    """gates_fp32 casts bf16 gates up before the kernels, which upcast every gate they load anyway: outputs and
    gradients are bitwise those of the default, and the gate gradients keep the gates' dtype."""
    tensors, seg, state = make_inputs(2, 1, 37, 16, 16, dtype=torch.float32, device=DEVICE, with_state=True,
                                      n_docs=3)
    tensors[3:] = [x.detach().bfloat16().requires_grad_() for x in tensors[3:]]
    flat = lambda r: [r[0], *r[1], *r[2]]  # noqa: E731
    default = flat(loss_and_grads(_fn("triton", 16), tensors, seg, state))
    with _launch_overrides(gates_fp32=True):
        cast = flat(loss_and_grads(_fn("triton", 16), tensors, seg, state))
    assert default[7].dtype == default[8].dtype == torch.bfloat16  # digate, dfgate
    for x, y in zip(default, cast):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_triton_segment_id_dtypes_agree():
    """The kernels find document starts in int32/int64 ids themselves; other dtypes (here int16 and float) go
    through the document index first. Every form gives bitwise the same outputs and gradients as int64 ids."""
    tensors, seg, state = make_inputs(2, 1, 45, 16, 16, dtype=torch.float32, device=DEVICE, with_state=True,
                                      n_docs=6)
    flat = lambda r: [r[0], *r[1], *r[2]]  # noqa: E731
    ref = flat(loss_and_grads(_fn("triton", 16), tensors, seg.long(), state))
    for dtype in (torch.int32, torch.int16, torch.float32):
        got = flat(loss_and_grads(_fn("triton", 16), tensors, seg.to(dtype), state))
        for x, y in zip(ref, got):
            assert torch.equal(x, y), dtype


class _LaunchSpy:
    """Stands in for a Triton kernel and records the keyword arguments (constexprs) of each launch."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize(
    "baseline, variant, chunk, exact, kernel, constexpr",
    [
        # the split dq/dk launch's math in another order (DQK and DV in two blocks)
        (dict(split_bwd=True), dict(split_bwd=True, dqdk_restructured=True), 16, False, "_bwd_grads",
         "DQDK_RESTRUCTURED"),
        # _fwd_output's math in another order (DQK in two blocks, two chunks, a partial one)
        ({}, dict(output_restructured=True), 32, False, "_fwd_output", "OUT_RESTRUCTURED"),
        # _bwd_states' dden loaded outside its vb == 0 branch, masked: the same values (two DV blocks, so a
        # program with vb > 0 whose mask is off)
        ({}, dict(dden_prefetch=True), 32, True, "_bwd_states", "DDEN_PREFETCH"),
        # the split dv launch from three causal half-size sub-tiles: chunks of 32 (a document starts at the
        # first chunk's second half, so its off-diagonal sub-tile is masked whole; the second chunk's upper half
        # lies past S) and of 64 (one chunk: the off-diagonal sub-tile across document starts, the upper half
        # partly past S)
        (dict(split_bwd=True), dict(split_bwd=True, dv_subtiles=True), 32, False, "_bwd_grads", "DV_SUBTILES"),
        (dict(split_bwd=True), dict(split_bwd=True, dv_subtiles=True), 64, False, "_bwd_grads", "DV_SUBTILES"),
        # the split dq/dk launch from the same three sub-tiles, same chunks
        (dict(split_bwd=True), dict(split_bwd=True, dqdk_subtiles=True), 32, False, "_bwd_grads", "DQDK_SUBTILES"),
        (dict(split_bwd=True), dict(split_bwd=True, dqdk_subtiles=True), 64, False, "_bwd_grads", "DQDK_SUBTILES"),
    ],
    ids=["dqdk_restructured", "output_restructured", "dden_prefetch", "dv_subtiles32", "dv_subtiles64",
         "dqdk_subtiles32", "dqdk_subtiles64"],
)
def test_triton_reordering_variants_equal_their_baseline(baseline, variant, chunk, exact, kernel, constexpr,
                                                         monkeypatch):
    """Launch settings that only reorder the kernels' work: outputs and every gradient equal the baseline's to
    fp32 rounding, or exactly where no sum is reordered (documents, initial state). The spy shows the variant's
    code path was launched (the interpreter may give bitwise the baseline's values even where the order differs).
    """
    from xdistill_kernels import chunkwise_triton

    tensors, seg, state = make_inputs(1, 2, 45, 128, 128, dtype=torch.float32, device=DEVICE, with_state=True,
                                      n_docs=3)
    flat = lambda r: [r[0], *r[1], *r[2]]  # noqa: E731
    with _launch_overrides(**baseline):
        expected = flat(loss_and_grads(_fn("triton", chunk), tensors, seg, state))
    spy = _LaunchSpy(getattr(chunkwise_triton, kernel))
    monkeypatch.setattr(chunkwise_triton, kernel, spy)
    with _launch_overrides(**variant):
        got = flat(loss_and_grads(_fn("triton", chunk), tensors, seg, state))
    assert any(launch.get(constexpr) for launch in spy.launches), spy.launches
    for i, (x, y) in enumerate(zip(expected, got)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) if exact else _rel(y, x) < 1e-6, (i, _rel(y, x))


def _grads_of_outputs(backend, tensors, seg, state, outputs, chunk_size=None):
    """loss_and_grads' gradients for the named ``outputs``; with ``outputs == ("h",)`` the state is not asked for
    (return_final_state=False), as in training."""
    with_state = outputs != ("h",)
    fn = _fn(backend, chunk_size, return_final_state=with_state)
    return loss_and_grads(fn, tensors, seg, state, outputs=outputs)[2]


@pytest.mark.parametrize("outputs", [("h",), ("h", "C"), ("C", "n")], ids=["h", "h+C", "state"])
def test_triton_gradients_when_outputs_are_unused(outputs, monkeypatch):
    """Training asks for h alone (return_final_state=False): then the final state is no output of the autograd
    function, and the backward skips the final-state path of _bwd_states (the spy). With the state returned,
    its unused parts (n, or h) get zero gradients. Every case matches the reference's gradients."""
    from xdistill_kernels import chunkwise_triton

    tensors, seg, state = make_inputs(2, 2, 37, 16, 32, dtype=torch.float32, device=DEVICE, with_state=True,
                                      n_docs=3)
    spy = _LaunchSpy(chunkwise_triton._bwd_states)
    monkeypatch.setattr(chunkwise_triton, "_bwd_states", spy)
    got = _grads_of_outputs("triton", tensors, seg, state, outputs, chunk_size=16)
    assert [launch["HAS_DFINAL"] for launch in spy.launches] == [outputs != ("h",)]
    ref_tensors, ref_state = _as_double(tensors, state)
    ref = _grads_of_outputs("parallel", ref_tensors, seg, ref_state, outputs)
    for i, (x, r) in enumerate(zip(got, ref)):
        assert _rel(x, r) < 5e-5, (i, _rel(x, r))


@pytest.mark.parametrize("flag", ["dqdk_restructured", "dv_subtiles", "dqdk_subtiles"])
def test_triton_split_only_flags_need_the_split(flag):
    tensors, _, _ = make_inputs(1, 2, 45, 128, 128, dtype=torch.float32, device=DEVICE)
    with _launch_overrides(**{flag: True}), pytest.raises(ValueError, match="split backward only"):
        mlstm(*tensors, backend="triton", chunk_size=16)  # L = 16: split_bwd is off


def test_split_set_runs_eagerly_inside_torch_compile(monkeypatch):
    """Inside torch.compile the split backward's set (L = 128, head dim 128) goes through the compiler-disabled
    apply (a graph break: compiled it failed in inductor on GPUs, chunkwise_triton._apply_eager), every other set
    through the plain one; outside compile always the plain one. Here compile is simulated (is_compiling patched)
    and the disabled apply spied on; the GPU test below compiles for real."""
    from xdistill_kernels import chunkwise_triton

    calls = []

    def spy(*args):
        calls.append(args)
        return chunkwise_triton._MLSTMChunkwise.apply(*args)

    monkeypatch.setattr(chunkwise_triton, "_apply_eager", spy)
    tensors, _, _ = make_inputs(1, 1, 20, 128, 128, dtype=torch.float32, device=DEVICE)
    want = mlstm(*tensors, backend="triton", chunk_size=128, return_final_state=False)
    assert not calls  # eager: the plain apply
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    mlstm(*tensors, backend="triton", chunk_size=64, return_final_state=False)
    assert not calls  # L = 64: no split, the plain apply (compiled for real)
    got = mlstm(*tensors, backend="triton", chunk_size=128, return_final_state=False)
    assert len(calls) == 1 and torch.equal(got, want)


def test_triton_rejects_unknown_launch_override():
    tensors, _, _ = make_inputs(1, 1, 8, 16, 16, dtype=torch.float32, device=DEVICE)
    for bad in (dict(bwd_grads={"num_warp": 4}), dict(bwd_gradz={"num_warps": 4}), dict(split_bwd=1),
                dict(state_segments=0), dict(state_segments=True), dict(carry_block=None)):
        with _launch_overrides(**bad), pytest.raises(ValueError, match="unknown launch override"):
            mlstm(*tensors, backend="triton")


def test_step_kernel_matches_reference():
    tensors, _, _ = make_inputs(3, 2, 4, 32, 64, dtype=torch.float32, device=DEVICE)
    tensors = [x.detach() for x in tensors]
    h_seq, final = mlstm(*tensors, backend="parallel", return_final_state=True)
    state = mlstm_fresh_state(3, 2, 32, 64, DEVICE)
    from xdistill_kernels.step_triton import mlstm_step_triton

    for t in range(4):
        h_t, state = mlstm_step_triton(*[x[:, :, t] for x in tensors], state)
        torch.testing.assert_close(h_t, h_seq[:, :, t], rtol=1e-5, atol=1e-5)
    for x, y in zip(state, final):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_triton_rejects_bad_head_dim():
    tensors, _, _ = make_inputs(1, 1, 8, 24, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="powers of two"):
        mlstm(*tensors, backend="triton")


# bf16 on the GPU. Inputs are rounded to bf16 once and the float64 reference sees the same rounded values,
# so the error is the kernels' own: bf16 operands of the matrix products (the chunk states, the gated
# score matrix and dh/z are rounded to bf16 before their dots, ~2^-9 relative each) and the bf16 rounding
# of the outputs, accumulated in fp32. Random rounding errors add in quadrature, so the relative norm error
# stays at a few 1e-3 (measured on an H100: see docs/kernels.md); 2e-2 is that with margin, while any wrong
# mask, decay or missing term gives O(1).
GPU_CASES = [
    ((2, 4, 1000, 128, 128), None, True, 0),
    ((2, 4, 1000, 128, 128), None, False, 6),
    ((1, 3, 777, 64, 64), None, True, 9),
    ((1, 2, 600, 256, 256), None, True, 3),
    ((1, 2, 600, 128, 128), 128, True, 3),
    ((1, 2, 8300, 64, 64), None, True, 5),  # S >= 4096: the default L = 128 at head dim 64, ragged last chunk
    ((1, 2, 4100, 128, 128), 128, True, 4),  # L = 128 at head dim 128 (the split backward), ragged
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,chunk,with_state,n_docs", GPU_CASES)
def test_triton_matches_reference_bf16_gpu(shape, chunk, with_state, n_docs, variant):
    check_against_reference(shape, chunk, dtype=torch.bfloat16, tol=2e-2, with_state=with_state,
                            n_docs=n_docs, variant=variant)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,chunk", [((1, 2, 1000, 128, 128), None), ((1, 2, 1000, 128, 128), 128),
                                         ((2, 2, 1000, 64, 64), 128)], ids=["L64", "L128-d128", "L128-d64"])
def test_triton_under_torch_compile_gpu(shape, chunk):
    """The training path as compile_blocks runs it: mlstm inside torch.compile, whose inductor launches our
    kernels itself and passes eps as fp64 (the kernels cast it back; without that the split dq/dk block failed
    to compile, H200, 2026-11-28). Output and gradients equal the eager call's to bf16 rounding. At L = 128,
    head dim 128 the call runs eagerly behind a graph break (chunkwise_triton._apply_eager)."""
    tensors, seg, _ = make_inputs(*shape, dtype=torch.bfloat16, device=DEVICE, n_docs=4)
    eager = _fn("triton", chunk, return_final_state=False)
    compiled = torch.compile(eager, dynamic=False)
    want = loss_and_grads(eager, tensors, seg, None, outputs=("h",))
    got = loss_and_grads(compiled, tensors, seg, None, outputs=("h",))
    for x, y in zip([got[0], *got[2]], [want[0], *want[2]]):
        assert _rel(x, y) < 1e-2, _rel(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_docs", [0, 6])
def test_triton_training_path_bf16_gpu(n_docs):
    """Training's call, h alone (no final-state gradient path), against the float64 reference; tolerance as in
    test_triton_matches_reference_bf16_gpu."""
    tensors, seg, state = make_inputs(2, 4, 1000, 128, 128, dtype=torch.bfloat16, device=DEVICE, with_state=True,
                                      n_docs=n_docs)
    got = _grads_of_outputs("triton", tensors, seg, state, ("h",))
    ref_tensors, ref_state = _as_double(tensors, state)
    ref = _grads_of_outputs("parallel", ref_tensors, seg, ref_state, ("h",))
    for i, (x, r) in enumerate(zip(got, ref)):
        assert torch.isfinite(x).all() and _rel(x, r) < 2e-2, (i, _rel(x, r))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_other_dtypes_gpu(dtype):
    """fp32 uses IEEE fp32 dots (tolerance as on CPU, a little looser for the longer sums); fp16 as bf16."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_against_reference((1, 4, 700, 128, 128), None, dtype=dtype, tol=tol, with_state=True, n_docs=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_extreme_gates_bf16_gpu():
    check_against_reference((1, 4, 900, 128, 128), None, dtype=torch.bfloat16, tol=2e-2, with_state=True,
                            n_docs=5, gate_scale=10.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_dispatch_gpu():
    """mlstm_step on CUDA without grad goes through the Triton kernel and equals the torch step."""
    from xdistill_kernels.reference import mlstm_step_reference

    tensors, _, state = make_inputs(64, 8, 1, 128, 128, dtype=torch.bfloat16, device="cuda", with_state=True)
    args = [x.detach()[:, :, 0] for x in tensors]
    state = tuple(x.detach().float() for x in state)
    h, new = mlstm_step(*args, state)
    h_ref, new_ref = mlstm_step_reference(*args, state)
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=1e-2, atol=1e-2)  # h rounded to bf16
    for x, y in zip(new, new_ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
