"""Ray start-up, in one place: every command that needs a cluster calls `ensure_ray` first.

It joins the cluster named in RAY_ADDRESS (what `ray job submit` sets), or starts
a local Ray instance on this machine (the embedded default).
"""

from __future__ import annotations

import os

import ray


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray instance (the embedded default)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
