"""Every shipped YAML parses with the real CLI parser, alone and composed with every teacher config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_xdistill.cli import XDistillCLI

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if yaml.safe_load(p.read_text()).get("model"))
TEACHERS = sorted((ROOT / "configs" / "teachers").glob("*.yaml"))


@pytest.mark.parametrize("stage", STAGES, ids=lambda p: p.name)
@pytest.mark.parametrize("teacher", [None, *TEACHERS], ids=lambda p: "default" if p is None else p.name)
def test_stage_config_parses(stage, teacher, capsys):
    args = ["fit", "--config", str(stage)] + (["--config", str(teacher)] if teacher else []) + ["--print_config"]
    with pytest.raises(SystemExit) as done:
        XDistillCLI(args=args)
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    if teacher is not None:
        want = yaml.safe_load(teacher.read_text())
        assert printed["model"]["init_args"]["teacher"]["name"] == want["model"]["init_args"]["teacher"]["name"]
        assert printed["data"]["tokenizer"] == want["data"]["tokenizer"]
        # composing a teacher must not drop the stage's own student settings
        stage_student = yaml.safe_load(stage.read_text())["model"]["init_args"].get("student", {})
        for key, value in stage_student.items():
            assert printed["model"]["init_args"]["student"][key] == value


def test_all_yaml_files_are_valid_yaml():
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert yaml.safe_load(path.read_text()) is not None, path


def test_dotted_null_override_converts_afresh(tmp_path):
    """`--model.init_args.student.init_from null` (the multi-GPU recipes use it) means "no stage-I result":
    jsonargparse hands it over as the string "None", which must not be taken for a folder name."""
    cli = XDistillCLI(args=["--config", str(ROOT / "configs" / "kd.yaml"),
                            "--model.init_args.student.init_from", "null",
                            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model.student_options.init_from is None
