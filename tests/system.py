"""Kept for imports written before tests/helpers.py: the whole system lives there now."""

from __future__ import annotations

from tests.helpers import PROGRAMS, System, free_port, kill9, running_system

__all__ = ["PROGRAMS", "System", "free_port", "kill9", "running_system"]
