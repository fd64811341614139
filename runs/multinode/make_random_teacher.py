"""Write a random-weight Llama teacher folder (Llama-3.1-8B shape by default) for the issue-7 benchmarks.

No hub access: the architecture comes from a ``LlamaConfig`` and the tokenizer is the offline SmolLM2 one
(its ids are a subset of the 128256-entry vocabulary, so logits and memory keep the 8B model's size).

    python runs/multinode/make_random_teacher.py runs/teachers/llama8b-random            # 8B shape, bf16
    python runs/multinode/make_random_teacher.py runs/teachers/llama-small --layers 8 --hidden 1024 \
        --intermediate 2816 --heads 16 --kv-heads 4                                     # loss-parity model
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_xdistill.teachers import TeacherSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: 16 GB for the 8B shape, not 32
    # On a GPU the random init takes seconds instead of minutes; save_pretrained copies to CPU itself.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(args.out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(args.out_dir)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {args.out_dir}")


if __name__ == "__main__":
    main()
