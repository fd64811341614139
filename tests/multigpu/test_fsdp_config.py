"""configs/fsdp.yaml: parses on top of every stage and teacher config, its FSDPStrategy instantiates
without a GPU, and its wrap / activation-checkpointing policy matches the decoder blocks of a student of
every supported teacher family (checkpointed blocks give the same gradients)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import yaml
from multigpu_helpers import FSDP_YAML, STAGES, TEACHERS, build_strategy_cli

from lit_xdistill.cli import XDistillCLI


@pytest.mark.parametrize("stage", STAGES, ids=lambda p: p.name)
@pytest.mark.parametrize("teacher", [None, *TEACHERS], ids=lambda p: "default" if p is None else p.name)
def test_fsdp_yaml_composes_with_stage_and_teacher(stage, teacher, capsys):
    configs = [stage, *([teacher] if teacher else []), FSDP_YAML]
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as done:
        XDistillCLI(args=args)
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    stage_cfg = yaml.safe_load(stage.read_text())
    trainer = printed["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert trainer["strategy"]["init_args"]["state_dict_type"] == "sharded"
    assert trainer["strategy"]["dict_kwargs"]["use_orig_params"] is True
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
    # fsdp.yaml adds trainer keys only: the stage's model, callbacks and max_steps survive composition
    assert printed["model"]["class_path"] == stage_cfg["model"]["class_path"]
    assert trainer["max_steps"] == stage_cfg["trainer"]["max_steps"]
    want_callbacks = [c["class_path"] for c in stage_cfg["trainer"].get("callbacks") or []]
    assert [c["class_path"] for c in trainer.get("callbacks") or []] == want_callbacks
    if teacher is not None:
        want = yaml.safe_load(teacher.read_text())["model"]["init_args"]["teacher"]["name"]
        assert printed["model"]["init_args"]["teacher"]["name"] == want


@pytest.mark.parametrize("stage", STAGES, ids=lambda p: p.name)
def test_fsdp_strategy_instantiates_as_configured(stage):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    trainer_init = build_strategy_cli(stage, FSDP_YAML).trainer_init
    strategy = trainer_init["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy is ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded"
    assert strategy.mixed_precision == MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )
    assert strategy.kwargs["use_orig_params"] and strategy.kwargs["sync_module_states"]
    # the YAML lists became ModuleWrapPolicy objects (a list of class paths would reach FSDP unconverted)
    wrap = strategy.kwargs["auto_wrap_policy"]
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    layer = LlamaDecoderLayer(_tiny_llama_config(), layer_idx=0)
    assert wrap(module=layer, recurse=False, nonwrapped_numel=0)
    assert checkpointing(module=layer, recurse=False, nonwrapped_numel=0)
    # the real Trainer keeps Lightning's rule: no FSDP on a CPU accelerator
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(**{**trainer_init, "accelerator": "cpu", "devices": 1, "logger": False})


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def policies():
    """(auto-wrap policy, activation-checkpointing policy) of fsdp.yaml, as the strategy holds them."""
    strategy = build_strategy_cli(STAGES[0], FSDP_YAML).trainer_init["strategy"]
    return strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"]


def _student(family: str):
    from tiny_teachers import tiny_teacher

    from lit_xdistill.models import student_from_teacher

    torch.manual_seed(0)
    return student_from_teacher(tiny_teacher(family), f"tiny-{family}", window=8).float()


def _family_names() -> list[str]:
    from lit_xdistill.teachers.families import FAMILIES

    return sorted(FAMILIES)


@pytest.mark.parametrize("family", _family_names())
def test_policies_wrap_exactly_the_decoder_blocks(family, policies):
    student = _student(family)
    blocks = {id(layer) for layer in student.decoder_layers()}
    for policy in policies:
        picked = {id(m) for m in student.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)}
        assert picked == blocks, f"{family}: the policy must pick every decoder block and nothing else"


@pytest.mark.parametrize("align", [False, True], ids=["kd-forward", "align-forward"])
def test_checkpointed_blocks_give_the_same_gradients(align, policies):
    """Lightning applies the checkpointing policy with torch's apply_activation_checkpointing; the hybrid
    mixer's recomputation (and stage I's recorded per-layer losses) must not change any gradient."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    plain = _student("llama").train()
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper, auto_wrap_policy=policies[1])
    assert all(isinstance(layer, CheckpointWrapper) for layer in wrapped.decoder_layers())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])

    def loss(model):
        out = model(input_ids=ids, segment_ids=segments, labels=ids, align=align)
        return out.loss + (sum(out.align_losses.values()) if align else 0)

    loss(plain).backward()
    loss(wrapped).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    wrapped_grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad
                     for n, p in wrapped.named_parameters() if p.grad is not None}
    assert grads.keys() == wrapped_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(wrapped_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
