"""Kernel launches with less host work per call than Triton's JITFunction.run.

At S = 4096 the mLSTM's eager forward + backward is bound by the host, not the GPU (docs/benchmarks.md). Each of its
seven to ten launches goes through JITFunction.run (triton 3.6). Each time, that binds every argument, specializes
it, builds and hashes a cache key (str() of the options included) and reads Triton's knobs. It then builds launch
metadata for the profiler hooks and calls both hook chains from C, even when they are empty. `CompiledLaunch`
sends the first launch of each specialization through JITFunction.run, which compiles and launches, and keeps the
CompiledKernel it returns. Later launches with the same specialization call that kernel's launcher directly, with
every tensor passed as its address: given a tensor, the launcher would make one driver call per pointer argument
(cuPointerGetAttribute) to check it.

The cache key is what the compiled kernel depends on, i.e. what JITFunction's own specialization reads:
- every tensor's dtype, with every address 16-byte aligned (a launch with any tensor off that alignment goes
  through JITFunction.run every time: one bit per tensor would cost a tuple entry each);
- every int's or bool's class (== 1, divisible by 16, fits in int32);
- the type of any other argument;
- the constexprs and launch options passed by keyword;
- the current device.

The direct path is used only where it has been checked: triton 3.6 (the GPU image's), compiled CUDA kernels (not
TRITON_INTERPRET), no launch hooks registered (e.g. proton's), and outside torch.compile. Inside torch.compile,
dynamo must see the JITFunction itself to wrap the kernel. Elsewhere `kernel[grid](...)` is JITFunction's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton
from torch import Tensor
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# The launcher call below follows triton 3.6's JITFunction.run (runtime/jit.py): kernel.run(grid_0, grid_1,
# grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *every signature argument,
# constexprs included).
_CHECKED_TRITON = ("3.6.",)
_DIRECT = triton.__version__.startswith(_CHECKED_TRITON) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# A launch given a CPU tensor goes through JITFunction.run, which raises a clear error, where the direct path would
# hand the GPU a host address. Off only in kernels/benchmarks/bench_host.py, which times the host path offline.
_CUDA_TENSORS_ONLY = True


class CompiledLaunch:
    """`fn` (a @triton.jit kernel) launched as `launch[grid](*args, **constexprs_and_options)`, like `fn` itself.

    Runtime arguments are passed by position and constexprs and launch options by keyword (checked at the first
    launch of each specialization)."""

    def __init__(self, fn: JITFunction) -> None:
        """fn: the kernel; its parameters must list every runtime argument before the constexprs."""
        self.fn = fn
        self._compiled: dict[tuple, tuple[Any, tuple]] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        """The launch over `grid` (1 to 3 ints)."""
        if not _DIRECT or torch.compiler.is_compiling() or knobs.runtime.launch_enter_hook.calls \
                or knobs.runtime.launch_exit_hook.calls:
            return self.fn[grid]
        return lambda *args, **meta: self._launch(grid, args, meta)

    def _launch(self, grid: tuple[int, ...], args: tuple, meta: dict[str, Any]) -> None:
        device = driver.active.get_current_device()
        key = [device, *meta.items()]
        launch_args = []  # tensors as their addresses (below)
        addresses = 0
        for arg in args:
            if isinstance(arg, Tensor):
                if _CUDA_TENSORS_ONLY and not arg.is_cuda:  # JITFunction.run raises its clear error
                    self.fn[grid](*args, **meta)
                    return
                address = arg.data_ptr()
                addresses |= address
                key.append(arg.dtype)
                launch_args.append(address)
            else:
                if type(arg) in (int, bool):
                    key.append((arg == 1, arg & 15 == 0, -(2 ** 31) <= arg < 2 ** 31))
                else:
                    key.append(type(arg))
                launch_args.append(arg)
        if addresses & 15:  # a tensor off 16-byte alignment: rare, and its kernel differs per such tensor
            self.fn[grid](*args, **meta)
            return
        key = tuple(key)
        entry = self._compiled.get(key)
        if entry is None:  # compile (or find in Triton's cache) and launch through JITFunction.run
            kernel = self.fn[grid](*args, **meta)
            self._compiled[key] = (kernel, self._constexpr_tail(args, meta))
            return
        kernel, tail = entry
        stream = driver.active.get_current_stream(device)
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        # Pointers go to the launcher as ints: given a tensor, triton 3.6's C launcher calls its data_ptr() and
        # then cuPointerGetAttribute, one driver call per pointer argument and launch (~20 per launch here)
        kernel.run(grid[0], grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *launch_args, *tail)

    def _constexpr_tail(self, args: tuple, meta: dict[str, Any]) -> tuple:
        """The values of the parameters after the positional ones (all constexprs), in signature order: the
        launcher takes every parameter, constexprs included, and ignores the constexprs."""
        tail = []
        for param in self.fn.params[len(args):]:
            if not param.is_constexpr:
                raise TypeError(f"{self.fn.__name__}: runtime argument {param.name} must be passed by position")
            tail.append(meta[param.name] if param.name in meta else param.default)
        return tuple(tail)


# Host-side grid arithmetic. triton.cdiv and triton.next_power_of_2 are constexpr functions in triton 3.6: called
# from host code each costs an import and two comprehensions (~3 us on the device hosts), several per call.
def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for ints x >= 0, y > 0."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
