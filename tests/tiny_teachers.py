"""Tiny random teachers of every supported family, built offline from their transformers configs."""

from __future__ import annotations

import torch


def tiny_teacher(family: str, seed: int = 0, **overrides):
    """A tiny random CausalLM of a supported family (offline: built from its transformers config)."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
        "olmo3": (tf.Olmo3Config, tf.Olmo3ForCausalLM, {"sliding_window": 8}),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                        {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    }
    config_cls, model_cls, extra = configs[family]
    torch.manual_seed(seed)
    config = config_cls(**{**common, **extra, **overrides})
    return model_cls(config).eval()


FAMILY_NAMES = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "gemma3_text"]


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer random ``LlamaForCausalLM`` (hidden 64, 4 query / 2 KV heads) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def save_tiny_teacher(folder, tokenizer, seed: int = 0, **overrides):
    """A local teacher folder: ``tiny_llama`` sized to the tokenizer, saved with it."""
    tiny_llama(len(tokenizer), seed, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bpe_tokenizer(texts, vocab_size: int, special_tokens: list[str], eos: str, bos: str, max_length: int):
    """A byte-level BPE tokenizer trained offline on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos, model_max_length=max_length)
