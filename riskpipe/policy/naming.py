"""How a policy (and a record's model) is named wherever a person reads it (report, console)."""

from __future__ import annotations

from typing import Any


def policy_label(policy: Any) -> str:
    """``name vVERSION · sha256 PREFIX``: name and version alone do not identify a policy
    (two files may both say ``default`` ``1.0.0``); the sha256 prefix does."""
    if not isinstance(policy, dict):
        return str(policy) if policy else "—"
    sha = policy.get("sha256")
    return f"{policy.get('name')} v{policy.get('version')}" + (f" · sha256 {str(sha)[:12]}" if sha else "")


def model_name(record: dict[str, Any]) -> str:
    """The name of the model a decision record names (its ``model`` dict, or a bare value)."""
    model = record.get("model")
    return str(model.get("name") if isinstance(model, dict) else model)
