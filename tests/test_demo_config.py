"""The CPU demo overlay composes with both stage configs (what `make demo` runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from lit_xdistill.cli import XDistillCLI

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", ["align", "kd"])
def test_demo_overlay_composes(stage, capsys):
    args = ["fit", "--config", str(ROOT / f"configs/{stage}.yaml"), "--config", str(ROOT / "configs/demo/cpu.yaml"),
            "--print_config"]
    with pytest.raises(SystemExit) as done:
        XDistillCLI(args=args)
    assert done.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["model"]["init_args"]["student"]["window"] == 64
    assert cfg["model"]["class_path"].endswith("AlignmentModule" if stage == "align" else "KDModule")


def test_demo_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "runs/demo.sh")]).returncode == 0
