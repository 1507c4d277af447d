"""Shared fixtures: the simulated universe and a running simulated archive on 127.0.0.1."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``live`` talk to the real IRSA: they run only when the ``-m`` expression
    names them (``pytest -m live``), never by default or in CI."""
    if "live" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="talks to the real IRSA: opt in with pytest -m live")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


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
