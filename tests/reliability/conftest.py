"""Fixtures live in reliability_helpers.py (a unique module name: several test folders import helpers)."""

from reliability_helpers import *  # noqa: F401,F403
