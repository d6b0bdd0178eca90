"""Evaluation of trained runs: loading, perplexity, lm-eval tasks, test-time budgets."""
