"""One writer per output: a lease file that a second job on the same output refuses (pipelines/data/precompute.py)."""

from __future__ import annotations


class LeaseHeld(RuntimeError):
    """Another live job holds the output's lease; the message names it and when the lease expires."""
