"""The three decisions a policy can reach, in the order every count and table shows them.

One tuple for the whole package: the policy's rule schema (``Rule.decision``), the ledger's
check of decision rows, the metrics' label values, the report's and the evaluation's tables
and the progress line all read it, so a count can never miss a decision another part writes.
"""

DECISIONS: tuple[str, str, str] = ("allow", "review", "block")
