"""Fixtures live in multigpu_helpers.py (a unique module name: several test folders import helpers)."""

from multigpu_helpers import docs_dir, smol_teacher_dir  # noqa: F401
