"""What the item page shows beyond the input view (riskpipe.render): controls split by framework."""

from __future__ import annotations

NIST_FUNCTIONS = ("GOVERN", "MAP", "MEASURE", "MANAGE")


def split_controls(controls) -> tuple[list[str], list[str]]:
    """(NIST AI RMF subcategory ids, other references such as ISO/IEC 27001 Annex A)."""
    nist: list[str] = []
    other: list[str] = []
    for c in controls if isinstance(controls, list) else []:
        (nist if str(c).upper().startswith(NIST_FUNCTIONS) else other).append(str(c))
    return nist, other
