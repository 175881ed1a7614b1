"""Policy evaluation on clean and attacked traffic (``riskpipe evaluate``).

``run_evaluation(Settings(...), workdir)`` sends clean and attacked samples through the
stage (offline mode) under each policy and returns a JSON-ready result;
``write_report(result, out_dir, formats)`` writes it as JSON, Markdown and HTML.
"""

from riskpipe.evaluate.harness import Budget, EvaluationError, Settings, parse_budgets, run_evaluation
from riskpipe.evaluate.report import FORMATS, render_markdown, tables, write_report

__all__ = ["FORMATS", "Budget", "EvaluationError", "Settings", "parse_budgets", "render_markdown",
           "run_evaluation", "tables", "write_report"]
