"""Teacher-vs-student evaluation: quality metrics, lm-eval, speed, long context, report."""

from distill.eval.evaluation import evaluate
from distill.eval.report import markdown_table

__all__ = ["evaluate", "markdown_table"]
