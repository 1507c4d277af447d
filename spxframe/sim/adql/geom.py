"""Spherical geometry for the simulated archive (vectorised numpy).

Polygons have great-circle edges. Point-in-polygon uses the gnomonic projection about the
polygon's centre (great circles map to straight lines there), which is exact for polygons
smaller than a hemisphere, whatever their orientation, and has no trouble with RA wrap or
poles. Angles are in degrees.
"""

from __future__ import annotations

import numpy as np

D2R = np.pi / 180.0


def unit(ra, dec) -> np.ndarray:
    """(…,) ra, dec in degrees -> (…, 3) unit vectors."""
    ra = np.asarray(ra, dtype=np.float64) * D2R
    dec = np.asarray(dec, dtype=np.float64) * D2R
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def angdist(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance in degrees (haversine, stable for small angles)."""
    ra1, dec1, ra2, dec2 = (np.asarray(x, dtype=np.float64) * D2R for x in (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return 2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0))) / D2R


def _norm(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class Polygons:
    """N spherical polygons with k vertices each (ragged input is padded by repetition).

    ``verts``: array (N, k, 2) of (ra, dec) degrees, or a list of vertex lists.
    Precomputes centres, tangent bases, projected vertices and bounding radii.
    """

    def __init__(self, verts):
        if isinstance(verts, np.ndarray) and verts.ndim == 3:
            v = verts.astype(np.float64)
        else:
            lists = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in verts]
            lists = [p[:-1] if len(p) > 3 and np.allclose(p[0], p[-1]) else p for p in lists]
            k = max((len(p) for p in lists), default=3)
            v = np.empty((len(lists), k, 2))
            for i, p in enumerate(lists):
                v[i, : len(p)] = p
                v[i, len(p):] = p[-1]  # degenerate repeated vertex: zero-length edge
        self.verts = v
        self.n = len(v)
        xyz = unit(v[..., 0], v[..., 1])  # (N,k,3)
        c = _norm(xyz.sum(axis=1)) if self.n else np.zeros((0, 3))
        self.center = c
        # tangent basis: e1 towards increasing RA (east), e2 = c x e1
        z = np.array([0.0, 0.0, 1.0])
        e1 = np.cross(z, c)
        small = np.linalg.norm(e1, axis=-1) < 1e-12
        e1[small] = [1.0, 0.0, 0.0]
        e1 = _norm(e1)
        e2 = np.cross(c, e1)
        self.e1, self.e2 = e1, e2
        w = np.einsum("nkj,nj->nk", xyz, c)
        self.proj = np.stack([np.einsum("nkj,nj->nk", xyz, e1) / w,
                              np.einsum("nkj,nj->nk", xyz, e2) / w], axis=-1)  # (N,k,2)
        cosr = np.clip(w.min(axis=1) if self.n else np.zeros(0), -1, 1)
        self.radius = np.arccos(cosr) / D2R  # degrees, centre to farthest vertex
        cra = np.arctan2(c[:, 1], c[:, 0]) / D2R % 360.0
        cdec = np.arcsin(np.clip(c[:, 2], -1, 1)) / D2R
        self.center_radec = np.stack([cra, cdec], axis=-1)

    def take(self, idx) -> Polygons:
        out = Polygons.__new__(Polygons)
        for name in ("verts", "center", "e1", "e2", "proj", "radius", "center_radec"):
            setattr(out, name, getattr(self, name)[idx])
        out.n = len(out.verts)
        return out

    def contains_pairs(self, pidx, p_xyz) -> np.ndarray:
        """For each pair j: is point p_xyz[j] inside polygon pidx[j]? (vectorised)."""
        pidx = np.asarray(pidx, dtype=np.int64)
        c, e1, e2 = self.center[pidx], self.e1[pidx], self.e2[pidx]
        w = np.einsum("mj,mj->m", p_xyz, c)
        front = w > 1e-9
        ws = np.where(front, w, 1.0)
        x = np.einsum("mj,mj->m", p_xyz, e1) / ws
        y = np.einsum("mj,mj->m", p_xyz, e2) / ws
        return front & _crossing(self.proj[pidx], x, y)

    def contains_points(self, ra, dec) -> np.ndarray:
        """Row-wise: polygon i contains point i (arrays broadcast to N)."""
        ra, dec = np.broadcast_arrays(np.asarray(ra, float), np.asarray(dec, float))
        n = max(self.n, ra.size)
        pidx = np.zeros(n, np.int64) if self.n == 1 else np.arange(n)
        p = unit(np.broadcast_to(ra, (n,)) if ra.size == 1 else ra.ravel(),
                 np.broadcast_to(dec, (n,)) if dec.size == 1 else dec.ravel())
        return self.contains_pairs(pidx, p)


def _crossing(poly2d: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd crossing test; poly2d (M,k,2), x,y (M,)."""
    xi, yi = poly2d[..., 0], poly2d[..., 1]
    xj, yj = np.roll(xi, 1, axis=1), np.roll(yi, 1, axis=1)
    X, Y = x[:, None], y[:, None]
    cond = (yi > Y) != (yj > Y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = (xj - xi) * (Y - yi) / (yj - yi) + xi
    hit = cond & (X < xint)
    return (hit.sum(axis=1) % 2) == 1


def candidate_pairs(p_ra, p_dec, c_ra, c_dec, radius, chunk: int = 2_000_000):
    """All (point i, region j) with angdist(point i, centre j) <= radius[j] (+1e-9).

    Sorted-by-dec windows bound the work; exact distances then filter. Returns (i, j).
    """
    p_ra, p_dec = np.asarray(p_ra, float), np.asarray(p_dec, float)
    c_ra, c_dec = np.asarray(c_ra, float), np.asarray(c_dec, float)
    radius = np.broadcast_to(np.asarray(radius, float), c_ra.shape)
    if p_ra.size == 0 or c_ra.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rmax = float(np.nanmax(radius)) + 1e-6
    order = np.argsort(c_dec, kind="stable")
    sdec = c_dec[order]
    lo = np.searchsorted(sdec, p_dec - rmax, side="left")
    hi = np.searchsorted(sdec, p_dec + rmax, side="right")
    # near the poles the dec window covers every RA anyway; that's still correct
    counts = hi - lo
    out_i, out_j = [], []
    pvec = unit(p_ra, p_dec)
    cvec = unit(c_ra, c_dec)
    cosr = np.cos(np.minimum(radius, 180.0) * D2R) - 1e-12
    start = 0
    n = len(p_ra)
    while start < n:
        # grow the chunk of points until the candidate count reaches `chunk`
        cum = np.cumsum(counts[start:])
        stop = start + max(1, int(np.searchsorted(cum, chunk, side="right")))
        stop = min(stop, n)
        cnt = counts[start:stop]
        tot = int(cnt.sum())
        if tot:
            ii = np.repeat(np.arange(start, stop), cnt)
            offs = np.arange(tot) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            jj = order[np.repeat(lo[start:stop], cnt) + offs]
            d = np.einsum("mj,mj->m", pvec[ii], cvec[jj])
            keep = d >= cosr[jj]
            out_i.append(ii[keep])
            out_j.append(jj[keep])
        start = stop
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def parse_stcs_polygons(strings) -> list:
    """'POLYGON ICRS ra dec ...' (frame optional) -> list of (k,2) arrays (NaN-filled if bad)."""
    out = []
    for s in strings:
        toks = str(s or "").replace("(", " ").replace(")", " ").split()
        nums = []
        for t in toks:
            try:
                nums.append(float(t))
            except ValueError:
                pass
        if len(nums) < 6:
            out.append(np.full((3, 2), np.nan))
        else:
            out.append(np.asarray(nums[: len(nums) // 2 * 2]).reshape(-1, 2))
    return out


def segments_intersect_sphere(a1, a2, b1, b2) -> np.ndarray:
    """Do great-circle arcs a1-a2 and b1-b2 (unit vectors, (...,3)) intersect?"""
    na = np.cross(a1, a2)
    nb = np.cross(b1, b2)
    t = np.cross(na, nb)
    tn = np.linalg.norm(t, axis=-1, keepdims=True)
    t = np.where(tn > 1e-15, t / np.where(tn > 0, tn, 1), 0.0)
    res = np.zeros(t.shape[:-1], bool)
    for s in (1.0, -1.0):
        p = s * t

        def on_arc(u1, u2, p=p):
            n = np.cross(u1, u2)
            return (np.einsum("...j,...j", np.cross(u1, p), n) >= 0) & \
                   (np.einsum("...j,...j", np.cross(p, u2), n) >= 0)

        res |= on_arc(a1, a2) & on_arc(b1, b2) & (tn[..., 0] > 1e-15)
    return res


def point_arc_distance(p, a, b) -> np.ndarray:
    """Angular distance (deg) from unit vectors p to great-circle arcs a-b (broadcast)."""
    n = np.cross(a, b)
    nn = np.linalg.norm(n, axis=-1, keepdims=True)
    n = n / np.where(nn > 0, nn, 1)
    sin_perp = np.einsum("...j,...j", p, n)
    proj = p - sin_perp[..., None] * n
    pn = np.linalg.norm(proj, axis=-1, keepdims=True)
    proj = proj / np.where(pn > 0, pn, 1)
    inside = (np.einsum("...j,...j", np.cross(a, proj), n) >= 0) & \
             (np.einsum("...j,...j", np.cross(proj, b), n) >= 0)
    d_perp = np.abs(np.arcsin(np.clip(sin_perp, -1, 1)))
    da = np.arccos(np.clip(np.einsum("...j,...j", p, a), -1, 1))
    db = np.arccos(np.clip(np.einsum("...j,...j", p, b), -1, 1))
    return np.where(inside, d_perp, np.minimum(da, db)) / D2R
