"""Against the real IRSA, for whoever has a network: ``pytest -m live`` (skipped otherwise and in
CI). A tiny TAP query at the north ecliptic pole (SPHEREx's deep field: always covered), one IBE
cutout and one byte-range read of the public cloud copy, each checked like the simulated ones.
Nothing here asserts a flux: the real sky has no truth table."""

from __future__ import annotations

import polars as pl
import pytest

import spxframe
from spxframe import spherex
from spxframe.fits.hdu import required_hdus, scan_fits

pytestmark = pytest.mark.live

NEP = pl.DataFrame({"source_id": [1], "ra": [270.0], "dec": [66.56]})


@pytest.fixture(scope="module")
def obs():
    got = spxframe.observations(NEP, bands=["D1"], releases=("qr2",))
    assert got.height > 0, "no QR2 D1 image at the north ecliptic pole: has the archive changed?"
    return got


def test_tap_query_finds_images_with_the_columns_we_need(obs):
    for col in ("obs_id", "detector", "file_url", "t_min", "release"):
        assert col in obs.columns and obs[col].null_count() == 0, col
    assert obs["collection"].is_in(spherex.RELEASES["qr2"].collections).all()


@pytest.mark.parametrize("access", ["cutout", "range"])
def test_one_small_box_arrives_whole_and_is_measured(obs, tmp_path, access):
    m = spxframe.plan(NEP, obs.sort("t_min").head(1), cutout_size="16px", access=access).manifest
    assert set(m["access"]) == {access}
    got = spxframe.fetch(m, cache_dir=tmp_path, progress=False)
    assert (got["status"] == "done").all(), got["error"].to_list()
    hdus = scan_fits(got["path"][0])
    assert set(required_hdus(hdus)) <= {h.name for h in hdus}
    phot = spxframe.measure(got["path"].to_list(), NEP, cache_dir=tmp_path)
    assert phot.height == 1
