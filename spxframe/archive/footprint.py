"""Footprints of SPHEREx L2 images from their ``s_region`` polygons (owner: client-plan).

The archive gives only the footprint: four vertices that are the outer pixel corners
(−0.5, −0.5), (2039.5, −0.5), (2039.5, 2039.5), (−0.5, 2039.5) (zero-based, spec §5.6).
We project sky positions gnomonically about the footprint centre and map the tangent plane to
pixels with the projective transform (homography) fixed by the four corners. For a pure TAN
WCS this is exact (gnomonic planes about different points are related by a homography); with
SIP distortion it is accurate to a few pixels. Angles in degrees, pixels zero-based.
"""

from __future__ import annotations

import re

import numpy as np

from spxframe.spherex import NPIX

__all__ = ["parse_s_region", "unit", "Footprints"]

D2R = np.pi / 180.0
_CORNERS = np.array([[-0.5, -0.5], [NPIX - 0.5, -0.5], [NPIX - 0.5, NPIX - 0.5], [-0.5, NPIX - 0.5]])
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def unit(ra, dec) -> np.ndarray:
    """ra, dec (deg) → unit vectors, shape (..., 3)."""
    ra = np.asarray(ra, dtype=np.float64) * D2R
    dec = np.asarray(dec, dtype=np.float64) * D2R
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def to_radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (..., 3) → (ra in [0, 360), dec) degrees."""
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    ra = np.arctan2(v[..., 1], v[..., 0]) / D2R % 360.0
    ra = np.where(ra >= 360.0, 0.0, ra)
    dec = np.arcsin(np.clip(v[..., 2], -1, 1)) / D2R
    return ra, dec


def parse_s_region(regions) -> np.ndarray:
    """STC-S ``POLYGON [ICRS] ra1 dec1 ... `` strings → (N, 4, 2) vertex array (deg).

    A repeated closing vertex is dropped. Raises ValueError for non-polygons or != 4 corners.
    """
    out = np.empty((len(regions), 4, 2))
    for i, s in enumerate(regions):
        if s is None or "POLYGON" not in s.upper():
            raise ValueError(f"s_region {s!r} is not an STC-S POLYGON")
        v = np.array([float(t) for t in _NUM.findall(s.upper().split("POLYGON", 1)[1])]).reshape(-1, 2)
        if len(v) == 5 and np.allclose(v[0], v[-1]):
            v = v[:4]
        if len(v) != 4:
            raise ValueError(f"s_region {s!r}: expected 4 corners, got {len(v)}")
        out[i] = v
    return out


def _homographies(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(N,4,2) src → (N,4,2) dst: the (N,3,3) projective maps with H[2,2] = 1."""
    n = src.shape[0]
    A = np.zeros((n, 8, 8))
    b = np.zeros((n, 8))
    for k in range(4):
        x, y = src[:, k, 0], src[:, k, 1]
        u, v = dst[:, k, 0], dst[:, k, 1]
        A[:, 2 * k, 0], A[:, 2 * k, 1], A[:, 2 * k, 2] = x, y, 1
        A[:, 2 * k, 6], A[:, 2 * k, 7] = -u * x, -u * y
        A[:, 2 * k + 1, 3], A[:, 2 * k + 1, 4], A[:, 2 * k + 1, 5] = x, y, 1
        A[:, 2 * k + 1, 6], A[:, 2 * k + 1, 7] = -v * x, -v * y
        b[:, 2 * k], b[:, 2 * k + 1] = u, v
    h = np.linalg.solve(A, b[..., None])[..., 0]
    return np.concatenate([h, np.ones((n, 1))], axis=1).reshape(n, 3, 3)


class Footprints:
    """N detector footprints (from ``s_region``) with sky ↔ approximate-pixel maps."""

    def __init__(self, corners: np.ndarray) -> None:
        self.corners = np.asarray(corners, dtype=np.float64).reshape(-1, 4, 2)
        cv = unit(self.corners[..., 0], self.corners[..., 1])  # (N,4,3)
        c = cv.sum(axis=1)
        self.centre = c / np.linalg.norm(c, axis=1, keepdims=True)
        axis = np.where(np.abs(self.centre[:, 2:3]) > 0.9, [[1.0, 0, 0]], [[0, 0, 1.0]])
        e = np.cross(axis, self.centre)
        self.e = e / np.linalg.norm(e, axis=1, keepdims=True)
        self.n = np.cross(self.centre, self.e)
        self.radius = np.degrees(np.arccos(np.clip(np.einsum("nkj,nj->nk", cv, self.centre), -1, 1))).max(axis=1)
        tp = self._tangent(np.arange(len(c))[:, None], cv)
        self.H = _homographies(tp, np.broadcast_to(_CORNERS, tp.shape))
        self.Hinv = np.linalg.inv(self.H)

    def __len__(self) -> int:
        return len(self.centre)

    @classmethod
    def from_s_region(cls, regions) -> Footprints:
        return cls(parse_s_region(list(regions)))

    def _tangent(self, idx: np.ndarray, v: np.ndarray) -> np.ndarray:
        c, e, n = self.centre[idx], self.e[idx], self.n[idx]
        w = np.sum(v * c, axis=-1)
        w = np.where(w > 1e-6, w, np.nan)  # far hemisphere: no projection
        return np.stack([np.sum(v * e, axis=-1) / w, np.sum(v * n, axis=-1) / w], axis=-1)

    def sky_to_pixel(self, idx, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """Zero-based approximate parent pixel (x, y) of (ra, dec) on footprints ``idx`` (NaN if far)."""
        idx = np.asarray(idx)
        t = self._tangent(idx, unit(ra, dec))
        H = self.H[idx]
        p = np.einsum("...ij,...j->...i", H, np.concatenate([t, np.ones(t.shape[:-1] + (1,))], axis=-1))
        return p[..., 0] / p[..., 2], p[..., 1] / p[..., 2]

    def pixel_to_sky(self, idx, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees of zero-based parent pixel (x, y) on footprints ``idx``."""
        idx = np.asarray(idx)
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        q = np.einsum("...ij,...j->...i", self.Hinv[idx], np.stack([x, y, np.ones_like(x)], axis=-1))
        xi, eta = q[..., 0] / q[..., 2], q[..., 1] / q[..., 2]
        v = self.centre[idx] + xi[..., None] * self.e[idx] + eta[..., None] * self.n[idx]
        return to_radec(v)

    def candidates(self, ra, dec, *, margin_deg: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """(source index, footprint index) pairs whose angular distance < footprint radius + margin."""
        from scipy.spatial import cKDTree

        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        if len(self) == 0 or len(ra) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        tree = cKDTree(unit(ra, dec))
        rmax = float(self.radius.max()) + margin_deg
        chord = 2 * np.sin(np.radians(rmax) / 2)
        hits = tree.query_ball_point(self.centre, chord, return_sorted=False)
        lens = np.fromiter((len(h) for h in hits), np.int64, len(hits))
        fi = np.repeat(np.arange(len(hits)), lens)
        si = np.fromiter((j for h in hits for j in h), np.int64, int(lens.sum()))
        return si, fi

    def contains(self, si, fi, ra, dec, *, margin_px: float = 0.0):
        """For pairs (source si, footprint fi): (inside, x, y) with a pixel ``margin_px`` outside the edge."""
        ra, dec = np.asarray(ra, float)[si], np.asarray(dec, float)[si]
        x, y = self.sky_to_pixel(fi, ra, dec)
        lo, hi = -0.5 - margin_px, NPIX - 0.5 + margin_px
        inside = (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi)
        return inside, x, y
