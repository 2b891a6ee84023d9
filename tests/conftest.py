"""Shared fixtures: one local Ray instance for the whole session (2 CPUs, no dashboard)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster left over from elsewhere
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()
