"""Risk policies: validated YAML -> signals -> composite score -> rule -> Decision.

``load_policy(path)`` returns an immutable ``Policy``; ``policy.evaluate(certificate,
upstream_risk=..., context=..., event_id=...)`` returns a ``Decision``. Pure: no I/O
beyond reading the policy file, no clock. Field reference: ``policies/README.md``.
"""

from riskpipe.policy.evaluate import Decision
from riskpipe.policy.loader import PolicyError, Problem, load_policy, parse_policy
from riskpipe.policy.schema import Policy

__all__ = ["Decision", "Policy", "PolicyError", "Problem", "load_policy", "parse_policy"]
