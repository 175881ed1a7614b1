"""The control identifiers a policy may cite (NIST AI RMF 1.0, ISO/IEC 27001:2022).

Identifiers are exact strings; a policy citing anything else is rejected, so a typo
never reaches an audit report. Descriptions are short paraphrases (see
``/work/shared/CONTROLS.md`` in the project notes and the standards themselves).
"""

from __future__ import annotations

NIST_AI_RMF = {
    "GOVERN 1.4": "risk management runs through transparent, documented policies and controls",
    "GOVERN 1.5": "ongoing monitoring and periodic review of the risk process, with roles",
    "GOVERN 3.2": "roles and responsibilities for human-AI configurations and oversight are defined",
    "MAP 3.5": "human oversight processes are defined, assessed and documented",
    "MEASURE 2.4": "the system's behaviour is monitored in production",
    "MEASURE 2.5": "validity and reliability shown; limits of generalisation documented",
    "MEASURE 2.7": "security and resilience are evaluated and documented",
    "MEASURE 2.8": "transparency and accountability risks examined and documented",
    "MEASURE 3.1": "existing, unanticipated and emergent risks are tracked in deployment",
    "MANAGE 1.3": "responses to high-priority risks are planned and documented",
    "MANAGE 2.4": "mechanisms exist to supersede, disengage or deactivate a system",
    "MANAGE 4.1": "post-deployment monitoring with appeal and override, incident response, change management",
    "MANAGE 4.3": "incidents and errors are communicated and tracked to recovery",
}

ISO_27001_ANNEX_A = {
    "ISO/IEC 27001:2022 A.5.28": "collection of evidence",
    "ISO/IEC 27001:2022 A.5.33": "protection of records",
    "ISO/IEC 27001:2022 A.8.15": "logging",
    "ISO/IEC 27001:2022 A.8.16": "monitoring activities",
}

CATALOG = {**NIST_AI_RMF, **ISO_27001_ANNEX_A}


def check_control(ref: str) -> str:
    """Return ``ref`` if it is a known control id, else raise ValueError naming the closest."""
    if ref in CATALOG:
        return ref
    import difflib

    close = difflib.get_close_matches(ref, CATALOG, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else " (see policies/README.md for the list)"
    raise ValueError(f"{ref!r} is not a known NIST AI RMF or ISO/IEC 27001:2022 Annex A id{hint}")
