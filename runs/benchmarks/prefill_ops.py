"""How many aten ops the student's prefill issues per forward, beside its teacher's, and from which lines.

Short prompts are bound by the host: every op costs host time before the GPU sees it (docs/benchmarks.md,
issue 9). Op counts do not depend on the device, so this runs on CPU, on the GPU path's code: the mixer's Triton
backends are selected and their kernel launches replaced by no-ops. The outputs are then meaningless, and only
the ops are counted, through a TorchDispatchMode. Each op is attributed to the innermost line of this
repository that issued it.

    python runs/benchmarks/prefill_ops.py --layers 8 --context 1024
"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
import transformers
import triton.runtime.jit
from torch.utils._python_dispatch import TorchDispatchMode

from lit_xdistill.models.decoding import StaticHybridCache
from lit_xdistill.models.modeling_xdistill import student_from_teacher


class OpCensus(TorchDispatchMode):
    """Counts every op dispatched inside it, by the innermost repository line on the Python stack."""

    def __init__(self) -> None:
        super().__init__()
        self.by_line: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ours = [f for f in traceback.extract_stack() if "/lit_xdistill/" in f.filename or "/kernels/" in f.filename]
        where = f"{ours[-1].filename.rsplit('/', 2)[-2]}/{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" \
            if ours else "(transformers / torch)"
        self.by_line[where] += 1
        return func(*args, **(kwargs or {}))


def census(forward) -> OpCensus:
    """Ops of one call of ``forward`` after a warm call (lazy allocations and caches settled)."""
    with torch.inference_mode():
        forward()
        counter = OpCensus()
        with counter:
            forward()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the SmolLM2-shaped models")
    parser.add_argument("--context", type=int, default=1024, help="prompt length")
    parser.add_argument("--window", type=int, default=256, help="the student's sliding window")
    parser.add_argument("--top", type=int, default=15, help="source lines to list")
    args = parser.parse_args()

    # host glue only: a Triton launch becomes a no-op (its output buffers stay uninitialised)
    triton.runtime.jit.JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: None)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=max(8192, args.context), tie_word_embeddings=True)
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = student_from_teacher(teacher, window=args.window, mlstm_backend="triton",
                                   pointwise_backend="triton").eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.context))
    t = census(lambda: teacher(prompt, logits_to_keep=1))
    s = census(lambda: student(prompt, cache=StaticHybridCache(batch_size=1, cuda_graph=False), use_cache=True,
                               logits_to_keep=1))
    n_t, n_s = sum(t.by_line.values()), sum(s.by_line.values())
    print(f"SmolLM2-shaped, {args.layers} layers, prefill of {args.context} tokens: teacher {n_t} ops, "
          f"student {n_s} ops ({(n_s - n_t) / args.layers:.1f} more per layer)")
    print("student, by source line:")
    for where, n in s.by_line.most_common(args.top):
        print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
