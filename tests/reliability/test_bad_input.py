"""Bad input catalogue (issue 8 item 4, issue 4 "Bad input"): each is refused early, naming the fix."""

from __future__ import annotations

import shutil

import pytest
from reliability_helpers import build_cli, kd_overlay

from lit_xdistill.data.logit_cache import LogitCacheError
from lit_xdistill.modules import KDModule, StageHandoffError, StudentOptions
from lit_xdistill.teachers import TeacherSpec


def fit(cli) -> None:
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@pytest.fixture
def overlay(teacher_dir, text_dir, tmp_path):
    return kd_overlay(teacher_dir, text_dir, tmp_path, max_steps=1)


@pytest.mark.parametrize(
    ("arg", "value", "expected"),
    [
        ("--model.init_args.lerning_rate", "1e-3", "lerning_rate"),  # unknown key
        ("--data.seq_len", "long", "seq_len"),  # wrong type
        ("--trainer.max_stepz", "3", "max_stepz"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused_by_the_parser(overlay, capsys, arg, value, expected):
    with pytest.raises(SystemExit) as exit_:
        build_cli(overlay, arg, value)
    assert exit_.value.code != 0
    assert expected in capsys.readouterr().err


def test_unknown_teacher_family(overlay, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    cli = build_cli(overlay, "--model.init_args.teacher.name", str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match=r"Teacher family 'gpt2' is not supported.*FamilyAdapter"):
        fit(cli)


def test_missing_data_path(overlay, tmp_path):
    cli = build_cli(overlay, "--data.sources", f"[{tmp_path / 'no_such_folder'}]")
    with pytest.raises((FileNotFoundError, ValueError), match="no_such_folder"):
        fit(cli)


def test_empty_dataset(overlay, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    cli = build_cli(overlay, "--data.sources", f"[{tmp_path / 'empty'}]")
    with pytest.raises(ValueError, match="empty. Give files with text"):
        fit(cli)


def test_seq_len_above_teacher_context(overlay):
    cli = build_cli(overlay, "--data.seq_len", "512")  # the tiny teacher has 256 positions
    with pytest.raises(ValueError, match=r"seq_len=512 exceeds .*256: lower seq_len"):
        fit(cli)


def test_logit_cache_of_another_seq_len(overlay, logit_cache):
    cli = build_cli(overlay, "--data.logit_cache", str(logit_cache), "--data.seq_len", "16")
    with pytest.raises(LogitCacheError, match=r"seq_len: cache has 32, expected 16.*Rewrite it"):
        fit(cli)


def test_logit_cache_of_another_tokenizer(overlay, logit_cache, teacher_dir, tmp_path):
    other = tmp_path / "other_tokenizer"
    shutil.copytree(teacher_dir, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text() + "{# another template: another tokenizer fingerprint #}")
    cli = build_cli(overlay, "--data.logit_cache", str(logit_cache), "--data.tokenizer", str(other))
    with pytest.raises(LogitCacheError, match="tokenizer_fingerprint: cache has"):
        fit(cli)


def test_logit_cache_of_another_teacher(overlay, logit_cache, teacher_dir, tmp_path):
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher_dir, other)
    cli = build_cli(
        overlay, "--data.logit_cache", str(logit_cache), "--model.init_args.teacher.name", str(other)
    )
    with pytest.raises(LogitCacheError, match="teacher: cache has"):
        fit(cli)


def _student_folder(teacher_dir, tmp_path):
    """An exported stage-I student (hybrid, window 16) of the tiny teacher."""
    from lit_xdistill.models import student_from_teacher

    spec = TeacherSpec(str(teacher_dir), dtype="float32")
    student_from_teacher(spec.load_model(), spec.identity, window=16).save_pretrained(tmp_path / "student")
    return tmp_path / "student"


def test_stage_one_result_of_another_teacher(teacher_dir, tmp_path):
    folder = _student_folder(teacher_dir, tmp_path)
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher_dir, other)
    module = KDModule(
        teacher=TeacherSpec(str(other), dtype="float32"), student=StudentOptions(init_from=str(folder))
    )
    with pytest.raises(StageHandoffError, match=r"was distilled from teacher .*Point init_from at a result"):
        module.configure_model()


def test_stage_one_checkpoint_of_another_architecture(teacher_dir, tmp_path):
    import torch

    torch.save(
        {"state_dict": {"student.backbone.extra_layer.weight": torch.zeros(2)}}, tmp_path / "align.ckpt"
    )
    module = KDModule(
        teacher=TeacherSpec(str(teacher_dir), dtype="float32"),
        student=StudentOptions(init_from=str(tmp_path / "align.ckpt"), window=16),
    )
    with pytest.raises(
        StageHandoffError, match="does not match the student architecture.*same student options"
    ):
        module.configure_model()


def test_stage_one_folder_of_another_architecture(teacher_dir, tmp_path):
    folder = _student_folder(teacher_dir, tmp_path)
    module = KDModule(
        teacher=TeacherSpec(str(teacher_dir), dtype="float32"),
        student=StudentOptions(init_from=str(folder), mixer="mlstm", window=16),
    )
    with pytest.raises(StageHandoffError, match="mixer"):
        module.configure_model()


def test_eval_suite_with_unknown_tasks(tmp_path):
    from lit_xdistill.eval.commands import evaluate

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: bad\ntasks:\n  - {task: arc_easy, shots: 0, metric: acc}\n  - {task: no_such_task}\n"
    )
    with pytest.raises(ValueError, match=r"unknown tasks \['no_such_task'\]"):
        evaluate(
            student=str(tmp_path / "missing_student"),
            teacher="smollm2-135m-instruct",
            suite=str(suite),
            out_dir=str(tmp_path / "out"),
        )
