"""A fifth method, as a newcomer would add one: one file per layer (docs/LAYOUT.md) and one
registry line (``register_method`` in ``tests/test_toy_method.py``).

``toy``: exact attention over each row's last ``window`` keys (0: every key).
"""
