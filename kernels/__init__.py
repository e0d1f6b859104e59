"""Triton kernels and their pure-PyTorch references; no knowledge of models or graphs."""

if __name__ == "kernels":  # the repository root is on sys.path: see _unshadow.py
    from ._unshadow import (
        hand_over as _hand_over,  # nothing of macopt: transformers may be mid-import
    )

    _hand_over(__name__, __file__)
