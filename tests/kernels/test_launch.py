"""CompiledLaunch (kernels/launch.py): the direct launch path against JITFunction.run.

On CPU the direct path cannot run a compiled kernel, so its cache is checked against a recording stand-in for
the kernel: which launches go through JITFunction.run, which go direct, and with which arguments. On a GPU
(marked) the real kernels run both ways and must agree bit for bit (one compiled binary, the same launch).
"""

from types import SimpleNamespace

import pytest
import torch
from mlstm_inputs import loss_and_grads, make_inputs
from triton import knobs
from xdistill_kernels import launch, mlstm
from xdistill_kernels.launch import CompiledLaunch


class _RecordingKernel:
    """A stand-in for a @triton.jit kernel with signature (x_ptr, y_ptr, n, eps, BLOCK: constexpr,
    FLAG: constexpr = True): `kernel[grid](...)` records a JITFunction.run launch and returns a compiled
    kernel whose launcher records the direct launches."""

    __name__ = "recording_kernel"

    def __init__(self):
        names = [("x_ptr", False), ("y_ptr", False), ("n", False), ("eps", False), ("BLOCK", True), ("FLAG", True)]
        self.params = [SimpleNamespace(name=name, is_constexpr=const, default=True if name == "FLAG" else None)
                       for name, const in names]
        self.jit_launches, self.direct_launches = [], []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.jit_launches.append((grid, args, meta))
            return SimpleNamespace(function="fn", packed_metadata="md",
                                   run=lambda *a: self.direct_launches.append(a))

        return run


@pytest.fixture
def direct(monkeypatch):
    """The direct path switched on, as on a CUDA device with triton 3.6, device 0 and stream 7; CPU tensors stand
    for CUDA tensors."""
    monkeypatch.setattr(launch, "_DIRECT", True)
    monkeypatch.setattr(launch, "_CUDA_TENSORS_ONLY", False)
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 7)))


def test_launches_after_the_first_go_direct_with_every_parameter(direct):
    kernel = _RecordingKernel()
    launcher = CompiledLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    launcher[(4, 2)](x, y, 33, 1e-6, BLOCK=64, num_warps=4)
    assert len(kernel.jit_launches) == 1 and not kernel.direct_launches
    launcher[(5,)](x, y, 17, 1e-3, BLOCK=64, num_warps=4)  # another odd n > 1: the same specialization
    assert len(kernel.jit_launches) == 1
    # grid padded to 3, the stream, the compiled handles, no launch metadata or hooks, then every parameter in
    # signature order: tensors as their addresses, the other runtime arguments as given, the constexprs from the
    # keywords or their defaults
    assert kernel.direct_launches == [
        (5, 1, 1, 7, "fn", "md", None, None, None, x.data_ptr(), y.data_ptr(), 17, 1e-3, 64, True)]


def test_cpu_tensors_go_through_jit_run(direct, monkeypatch):
    """Where a launch gets a CPU tensor, JITFunction.run raises its clear error instead of the GPU getting a host
    address."""
    monkeypatch.setattr(launch, "_CUDA_TENSORS_ONLY", True)
    kernel = _RecordingKernel()
    launcher = CompiledLaunch(kernel)
    for _ in range(2):
        launcher[(1,)](torch.zeros(64), torch.zeros(64), 33, 1e-6, BLOCK=64)
    assert len(kernel.jit_launches) == 2 and not kernel.direct_launches


@pytest.mark.parametrize("change", ["dtype", "int_class", "bool", "constexpr", "option"])
def test_a_new_specialization_goes_through_jit_run(direct, change):
    kernel = _RecordingKernel()
    launcher = CompiledLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    flag = True  # a bool runtime argument: its value is part of the specialization
    launcher[(1,)](x, y, 33, flag, BLOCK=64, num_warps=4)
    args, meta = [x, y, 33, flag], dict(BLOCK=64, num_warps=4)
    if change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "int_class":
        args[2] = 32  # divisible by 16: Triton specializes on it
    elif change == "bool":
        args[3] = False
    elif change == "constexpr":
        meta["BLOCK"] = 128
    else:
        meta["num_warps"] = 8
    launcher[(1,)](*args, **meta)
    launcher[(1,)](*args, **meta)
    assert len(kernel.jit_launches) == 2 and len(kernel.direct_launches) == 1


def test_a_misaligned_tensor_always_goes_through_jit_run(direct):
    kernel = _RecordingKernel()
    launcher = CompiledLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(65)
    shifted = y[1:]  # 4 bytes past an aligned allocation
    assert shifted.data_ptr() % 16
    for _ in range(3):
        launcher[(1,)](x, shifted, 33, 1e-6, BLOCK=64)
    assert len(kernel.jit_launches) == 3 and not kernel.direct_launches


def test_registered_launch_hooks_see_every_launch(direct):
    kernel = _RecordingKernel()
    launcher = CompiledLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    launcher[(1,)](x, y, 33, 1e-6, BLOCK=64)

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher[(1,)](x, y, 33, 1e-6, BLOCK=64)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.jit_launches) == 2 and not kernel.direct_launches


def test_runtime_arguments_by_keyword_are_refused(direct):
    launcher = CompiledLaunch(_RecordingKernel())
    with pytest.raises(TypeError, match="eps must be passed by position"):
        launcher[(1,)](torch.zeros(4), torch.zeros(4), 33, eps=1e-6, BLOCK=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not launch._DIRECT, reason="the direct path is checked on triton 3.6 only")
@pytest.mark.parametrize("n_docs", [0, 5])
def test_direct_launches_equal_jit_launches_gpu(n_docs, monkeypatch):
    """The mLSTM forward + backward (its 6-7 kernels) launched directly equals JITFunction.run's launches bit
    for bit, also with q off 16-byte alignment (a launch that must take JITFunction.run's other binary)."""
    tensors, seg, state = make_inputs(2, 3, 777, 64, 64, dtype=torch.bfloat16, device="cuda", with_state=True,
                                      n_docs=n_docs)
    q = tensors[0]
    storage = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    misaligned_q = storage[1:].view_as(q).copy_(q).detach().requires_grad_()
    assert misaligned_q.data_ptr() % 16

    def run(inputs):
        h, final, grads = loss_and_grads(lambda *a, **kw: mlstm(*a, backend="triton", return_final_state=True,
                                                                **kw), inputs, seg, state)
        return (h, *final, *grads)

    for inputs in (tensors, [misaligned_q, *tensors[1:]]):
        run(inputs)  # first launches: compile and cache
        direct = run(inputs)
        monkeypatch.setattr(launch, "_DIRECT", False)
        jit = run(inputs)
        monkeypatch.setattr(launch, "_DIRECT", True)
        assert len(direct) == 11
        for a, b in zip(direct, jit):
            assert torch.equal(a, b)
