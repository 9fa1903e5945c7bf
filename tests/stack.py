"""Kept for imports written before tests/helpers.py: the stage stack lives there now."""

from __future__ import annotations

from tests.helpers import ROOT, StageStack, running_stack, short_tmpdir, stack_env

__all__ = ["ROOT", "StageStack", "running_stack", "short_tmpdir", "stack_env"]
