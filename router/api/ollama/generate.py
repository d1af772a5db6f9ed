"""(being written)"""

from __future__ import annotations


def routes(state) -> list:
    return []
