"""Evaluation tools: pass@k under cache budgets, fidelity to the full cache, reports, benchmarks."""
