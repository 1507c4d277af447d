"""Shared fixtures: the simulated universe and a running simulated archive on 127.0.0.1."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def universe():
    from spxframe import sim

    # a large strip cache: the end-to-end tests revisit the same simulated images from many cells
    return sim.Universe(seed=1, cache_strips=768, releases=("qr2",))


@pytest.fixture(scope="session")
def archive(universe):
    from spxframe import sim

    with sim.serve(universe=universe) as arc:
        yield arc
