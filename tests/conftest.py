"""Shared fixtures: the simulated universe and a running simulated archive on 127.0.0.1."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def universe():
    from spxframe import sim

    return sim.Universe(seed=1)


@pytest.fixture(scope="session")
def archive(universe):
    from spxframe import sim

    with sim.serve(universe=universe) as arc:
        yield arc
