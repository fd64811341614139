"""Fixtures live in eval_helpers.py (a unique module name: several test folders import helpers)."""

from eval_helpers import *  # noqa: F401,F403
