"""``macopt eval``: what the approximate methods cost, measured on any causal LM.

:mod:`macopt.evaluation.tasks` generates RULER-style retrieval tasks from a seed over real
filler text; :mod:`macopt.evaluation.harness` runs methods side by side (perplexity, task
accuracy, greedy agreement with the unmodified model, per-layer stats).
"""
