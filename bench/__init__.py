"""Reproducible side-by-side benchmark of vrypt_worker and the servers users would pick instead.

Run it with ``python -m bench`` from the project root (``python -m bench --help`` for options).
"""
