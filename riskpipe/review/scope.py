"""Which records belong to the console's stage.

Several stages may share one review topic (and a ledger may hold what another
console copied in). The console's config names its stage: the models it runs and,
per model, the policy that decides its events. A record belongs to the stage when
its model is one of those and its policy is that model's policy, identified by
name, version *and* sha256 (two policies may both call themselves ``v1.0.0``).
The console ingests and shows only those; what it leaves out it counts, so nothing
disappears without a number on the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from riskpipe.policy import load_policy


@dataclass(frozen=True)
class PolicyId:
    name: str
    version: str
    sha256: str

    @classmethod
    def of(cls, record: Any) -> PolicyId | None:
        p = record.get("policy") if isinstance(record, dict) else None
        if not isinstance(p, dict):
            return None
        return cls(str(p.get("name")), str(p.get("version")), str(p.get("sha256")))


@dataclass(frozen=True)
class StageScope:
    """Model name -> the policy that decides its events, from the stage config."""

    policies: dict[str, PolicyId]

    @classmethod
    def from_config(cls, config) -> StageScope:
        """The scope of a loaded ``StageConfig`` (each model's policy file is loaded and
        checked as the stage loads it)."""

        loaded: dict[str, PolicyId] = {}
        out = {}
        for name in config.models:
            path = config.model_policy(name)
            if path not in loaded:
                p = load_policy(path)
                loaded[path] = PolicyId(p.name, str(p.version), p.sha256)
            out[name] = loaded[path]
        return cls(out)

    def refuses(self, record: Any) -> str | None:
        """None when ``record`` is one of this stage's; else why not (one line)."""
        model = record.get("model") if isinstance(record, dict) else None
        name = model.get("name") if isinstance(model, dict) else model
        if name not in self.policies:
            return f"model {name!r} is not one of this stage's ({', '.join(sorted(self.policies))})"
        want, got = self.policies[name], PolicyId.of(record)
        if got != want:
            have = f"{got.name} v{got.version} sha256 {got.sha256[:12]}" if got else "no policy"
            return (f"model {name!r} decided under {have}, not this stage's policy "
                    f"{want.name} v{want.version} sha256 {want.sha256[:12]}")
        return None

    def describe(self) -> str:
        return "; ".join(f"{m}: policy {p.name} v{p.version} sha256 {p.sha256[:12]}"
                         for m, p in sorted(self.policies.items()))
