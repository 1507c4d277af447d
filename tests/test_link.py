"""Access chosen by the user's link (issue 14): the simulated link cap, the cost model's choice on
fast and slow links, the link a run records, and cutout_size=None measured as accurately as a box."""

from __future__ import annotations

import threading
import time

import numpy as np
import polars as pl
import pytest
import requests

import spxframe
from spxframe import sim
from spxframe.archive.query import observations
from spxframe.fetcher.engine import fetch
from spxframe.planner.cost import LINK_FILE, CostModel, load_link, record_link
from spxframe.planner.manifest import plan
from spxframe.schema import QC
from spxframe.sim.services.faults import Faults

FAST = CostModel.for_link(bandwidth_Bps=100e6, latency_s=0.02)
HOME = CostModel.for_link(bandwidth_Bps=5e6, latency_s=0.1)
SLOW = CostModel.for_link(bandwidth_Bps=1e6, latency_s=0.1)


@pytest.fixture(scope="module")
def few(universe, archive):
    """Six sources of the generic wide field and their images."""
    cat = universe.sources.filter(pl.col("field") == "wide_generic").head(6).select("source_id", "ra", "dec")
    return cat, observations(cat, archive=archive)


def test_link_cap_is_shared_by_concurrent_downloads(universe):
    """Two concurrent 3 MB downloads over a 6 MB/s link take ~1 s together (each alone would be
    allowed the whole link: a per-response cap would finish both in ~0.5 s)."""
    cap, n = 6e6, 3_000_000
    with sim.serve(universe=universe, faults=Faults(link_bps=cap)) as arc:
        key = universe.observations["cloud_key"][0]
        url = f"{arc.cloud_url}/{key}"
        got: list[int] = []

        def get() -> None:
            r = requests.get(url, headers={"Range": f"bytes=0-{n - 1}"}, timeout=60)
            got.append(len(r.content))

        threads = [threading.Thread(target=get) for _ in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    assert got == [n, n]
    assert elapsed >= 0.9 * 2 * n / cap, elapsed  # the link holds for both together
    assert elapsed < 3 * 2 * n / cap, elapsed


def test_choice_flips_with_the_link(few, archive):
    """cutout_size=None (25-px boxes): full-width rows on a fast link, the boxes' own columns on
    a slow one; at 200 px box columns would cost ~800 requests per image and are never planned."""
    cat, obs = few
    fast = plan(cat, obs, cutout_size=None, archive=archive, cost=FAST).manifest
    slow = plan(cat, obs, cutout_size=None, archive=archive, cost=SLOW).manifest
    assert set(fast["access"]) == {"range"} and (fast["max_gap"] >= 8160).all()
    assert set(slow["access"]) == {"range"} and (slow["max_gap"] == 0).all()
    # the slow plan moves far fewer bytes, in more requests
    f, s = (plan(cat, obs, cutout_size=None, archive=archive, cost=c).summary for c in (FAST, SLOW))
    assert s["predicted_bytes"].sum() * 2 < f["predicted_bytes"].sum()  # the PSF cubes are in both
    assert s["requests"].sum() > 4 * f["requests"].sum()
    for cost in (FAST, HOME, SLOW):
        big = plan(cat, obs, archive=archive, cost=cost).manifest
        assert not (big["max_gap"] == 0).any()
    # an IBE cutout wins once its server time is small next to moving 200 full-width rows
    quick_ibe = CostModel.for_link(bandwidth_Bps=1e6, latency_s=0.1, cutout_server_s=0.1)
    assert (plan(cat, obs, archive=archive, cost=quick_ibe).manifest["access"] == "cutout").mean() > 0.5
    assert set(plan(cat, obs, archive=archive, cost=SLOW).manifest["access"]) == {"range"}  # IRSA's ~15 s each


def test_a_recorded_link_steers_the_next_plan(few, archive, tmp_path):
    cat, obs = few
    assert load_link(tmp_path).source == "default"
    assert record_link(tmp_path, nbytes=1_000, seconds=5.0) is None  # too little to judge
    rec = record_link(tmp_path, nbytes=50_000_000, seconds=50.0, request_s=0.1)
    assert rec is not None and rec["bandwidth_Bps"] == pytest.approx(1e6)
    cost = load_link(tmp_path)
    assert cost.bandwidth_Bps == pytest.approx(1e6) and cost.source.endswith(LINK_FILE)
    m = plan(cat, obs, cutout_size=None, archive=archive, cost=cost).manifest
    assert (m["max_gap"] == 0).all()
    (tmp_path / LINK_FILE).write_text("{not json")
    assert load_link(tmp_path).source == "default"


def _measure(universe, cat, m, cache, max_gap):
    got = fetch(m, cache_dir=cache, progress=False, max_gap=max_gap)
    assert (got["status"] == "done").all(), got["error"].unique().to_list()
    files = got.filter(pl.col("path").is_not_null())
    return spxframe.measure(files, cat, cache_dir=cache).sort("source_id", "obs_id", "detector")


@pytest.mark.slow
def test_none_measures_as_well_as_a_big_box(universe, archive, few, tmp_path):
    """The 25-px measurement boxes (box columns, then full-width rows) give the fluxes of 64-px
    boxes of the same images, and those match the simulated truth."""
    cat, obs = few
    obs = obs.sort("obs_id", "detector").head(24)
    small = plan(cat, obs, cutout_size=None, archive=archive, cost=SLOW).manifest
    assert (small["max_gap"] == 0).all() and (small.filter(~pl.col("clipped"))["box_nx"] == 25).all()
    ref = _measure(universe, cat, plan(cat, obs, cutout_size="64px", access="range", archive=archive).manifest,
                   tmp_path / "big", 128 * 1024)
    for gap, where in ((0, "cols"), (8160, "rows")):
        got = _measure(universe, cat, small, tmp_path / where, gap)
        assert got.height == ref.height > 18
        keep = ~QC["CUTOUT_CLIPPED"]  # a 64-px box reaches a detector edge sooner than a 25-px one
        assert ((got["qc"] & keep) == (ref["qc"] & keep)).all()
        ok = ref["flux"].is_not_nan().to_numpy()
        assert ok.sum() > 12
        np.testing.assert_allclose(got["flux"].to_numpy()[ok], ref["flux"].to_numpy()[ok], rtol=1e-6)
    true = universe.truth_flux(ref["source_id"].to_numpy(), ref["wavelength"].to_numpy(), ref["mjd"].to_numpy())
    f, e = ref["flux"].to_numpy()[ok], ref["flux_err"].to_numpy()[ok]
    bright = true[ok] > 50 * e
    assert bright.sum() > 5 and abs(np.median(f[bright] / true[ok][bright]) - 1) < 0.02
