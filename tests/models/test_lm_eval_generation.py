"""lm-eval's generate_until runs on the student and returns exactly the student's own greedy decode."""

from __future__ import annotations

import torch

from lit_xdistill.models import student_from_teacher
from lit_xdistill.teachers import TeacherSpec


def test_generate_until_matches_greedy_decode():
    import transformers as tf
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    student = student_from_teacher(tf.LlamaForCausalLM(cfg), window=8, n_sinks=2, ogate_bias=0.0).eval()
    lm = HFLM(pretrained=student, tokenizer=tok, backend="causal", batch_size=1, max_length=256)
    prompts = ["The cat sat on the", "def add(a, b):\n    return"]
    requests = [
        Instance("generate_until", doc={}, arguments=(p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
                 idx=i)
        for i, p in enumerate(prompts)
    ]
    outputs = lm.generate_until(requests)
    for prompt, text in zip(prompts, outputs):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(12):  # uncached greedy reference
                ids = torch.cat([ids, student(ids).logits[:, -1:].argmax(-1)], 1)
        reference = tok.decode(ids[0, len(tok(prompt).input_ids):]).split("\n\n")[0]
        assert text == reference
