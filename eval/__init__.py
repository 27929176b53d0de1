"""Teacher-vs-student evaluation: quality metrics, lm-eval, speed, long context, report."""
