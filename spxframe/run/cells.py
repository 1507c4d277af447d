"""Sky cells: HEALPix (NESTED) indices, the unit of work of a run.

Sources in one cell share images, so a cell's files are opened once for all its sources.
A self-contained ``ang2pix`` (Górski et al. 2005) keeps healpy out of the dependencies;
it is tested against the defining properties (equal area, nesting) in ``tests/test_cells.py``.
"""

from __future__ import annotations

import numpy as np

#: default HEALPix order of a work cell: nside = 2**3 = 8, cells of ~7.3 deg (~54 deg²), about
#: twice a detector's 3.5 deg field, so most images fall in one cell and are fetched once
DEFAULT_ORDER = 3


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Interleave the bits of ``v`` with zeros (v < 2**29)."""
    v = v.astype(np.uint64)
    out = np.zeros_like(v)
    for i in range(30):
        out |= ((v >> np.uint64(i)) & np.uint64(1)) << np.uint64(2 * i)
    return out


def ang2pix_nest(order: int, ra_deg, dec_deg) -> np.ndarray:
    """HEALPix NESTED pixel index of (ra, dec) in degrees at ``order`` (nside = 2**order).

    Returns int64 indices in ``[0, 12 * 4**order)``.
    """
    nside = 1 << int(order)
    ra = np.radians(np.mod(np.asarray(ra_deg, dtype=np.float64), 360.0))
    z = np.sin(np.radians(np.asarray(dec_deg, dtype=np.float64)))
    ra, z = np.broadcast_arrays(ra, z)
    za = np.abs(z)
    tt = np.mod(ra, 2 * np.pi) / (np.pi / 2)  # in [0, 4)

    face = np.empty(ra.shape, dtype=np.int64)
    ix = np.empty(ra.shape, dtype=np.int64)
    iy = np.empty(ra.shape, dtype=np.int64)

    eq = za <= 2.0 / 3.0
    # equatorial region
    temp1 = nside * (0.5 + tt[eq])
    temp2 = nside * (z[eq] * 0.75)
    jp = (temp1 - temp2).astype(np.int64)
    jm = (temp1 + temp2).astype(np.int64)
    ifp = jp // nside
    ifm = jm // nside
    f = np.where(ifp == ifm, ifp | 4, np.where(ifp < ifm, ifp, ifm + 8))
    face[eq] = f
    ix[eq] = jm & (nside - 1)
    iy[eq] = nside - (jp & (nside - 1)) - 1

    pol = ~eq
    ntt = np.minimum(tt[pol].astype(np.int64), 3)
    tp = tt[pol] - ntt
    tmp = nside * np.sqrt(3.0 * (1.0 - za[pol]))
    jp = np.minimum((tp * tmp).astype(np.int64), nside - 1)
    jm = np.minimum(((1.0 - tp) * tmp).astype(np.int64), nside - 1)
    north = z[pol] >= 0
    face[pol] = np.where(north, ntt, ntt + 8)
    ix[pol] = np.where(north, nside - jm - 1, jp)
    iy[pol] = np.where(north, nside - jp - 1, jm)

    sub = _spread_bits(ix) | (_spread_bits(iy) << np.uint64(1))
    return (face.astype(np.int64) << (2 * int(order))) + sub.astype(np.int64)


def cell_of(ra_deg, dec_deg, *, order: int = DEFAULT_ORDER) -> np.ndarray:
    """Work-cell id of each position (HEALPix NESTED at ``order``)."""
    return ang2pix_nest(order, ra_deg, dec_deg)
