"""Benchmarks behind ``macopt bench``: one module per benchmark, shared timing in :mod:`timing`.

Each benchmark module defines ``add_parser(subparsers)`` (registering itself under
``macopt bench``) and a ``run(...)`` function usable from Python.
"""
