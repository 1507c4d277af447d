"""The simulated sky: point sources with smooth 0.75-5 µm spectra and variability classes.

Fluxes are flux densities in µJy. ``truth_flux(source_id, λ[µm], mjd)`` is the truth the client
is validated against. Spectrum × variability:

    F(λ, t) = F2 · S(λ) · V(t)          (S(2 µm) = 1 without the line)

with S a power law ``(λ/2)^α`` or a blackbody-like ``B_ν(T)`` shape normalised at 2 µm, optionally
plus a Gaussian emission line (σ = 1 % of λ_line), and V(t):

- ``constant``: 1;
- ``periodic``: 1 + A sin(2π (t - t0)/P + φ), P 2-30 d;
- ``outburst``: 1 + A · rise · exp(-(t - tp)/τ) for t > tp (Gaussian rise of 0.7 d before tp);
- ``trend``: 1 + k (t - t0)/365;
- ``fading_negative``: 1 - (t - t0)/τ, crossing zero inside the field's observing window, so the
  truth flux becomes negative (the source is fainter than the background it was subtracted from).

Positions are ICRS at ``ref_epoch`` (Julian year 2016.0); ``pmra`` includes cos(dec) (mas/yr).
"""

from __future__ import annotations

import numpy as np
import polars as pl

VAR_CLASSES: tuple[str, ...] = ("constant", "periodic", "outburst", "trend", "fading_negative")
VAR_PROBS: tuple[float, ...] = (0.58, 0.17, 0.10, 0.11, 0.04)
LINES_UM: tuple[float, ...] = (1.083, 1.875, 3.3, 4.05)
REF_EPOCH: float = 2016.0
_H_C_OVER_K = 14387.77  # µm K


def cap_points(rng: np.random.Generator, ra0: float, dec0: float, radius_deg: float,
               n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform on the sphere within ``radius_deg`` of (ra0, dec0) (works at the poles)."""
    cosr = np.cos(np.radians(radius_deg))
    z = rng.uniform(cosr, 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    s = np.sqrt(1 - z * z)
    v = np.stack([s * np.cos(phi), s * np.sin(phi), z])  # about +Z
    a, d = np.radians(ra0), np.radians(dec0)
    # rotate +Z to (a, d): first about Y by (90° - dec), then about Z by ra
    t = np.pi / 2 - d
    ry = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    x, y, zz = rz @ ry @ v
    return np.degrees(np.arctan2(y, x)) % 360.0, np.degrees(np.arcsin(np.clip(zz, -1, 1)))


def make_sources(seed: int, fields: list[dict], n_per_field: int | None) -> pl.DataFrame:
    """Source table for all fields. ``fields``: dicts with name, ra, dec, radius, t_lo, t_hi (MJD) and
    optional n_sources (default 2000); ``n_per_field`` overrides every field's count."""
    parts = []
    for fi, f in enumerate(fields):
        rng = np.random.default_rng([int(seed), 31, fi])
        n = int(f.get("n_sources", 2000)) if n_per_field is None else int(n_per_field)
        ra, dec = cap_points(rng, f["ra"], f["dec"], f["radius"], n)
        # fluxes at 2 µm: steep counts between 30 µJy and 20 mJy, plus a few saturating ones
        u = rng.uniform(0, 1, n)
        f2 = 30.0 * (20000.0 / 30.0) ** (u**1.7)
        bright = rng.uniform(0, 1, n) < 0.006
        f2 = np.where(bright, rng.uniform(1e5, 1e6, n), f2)
        cls = rng.choice(len(VAR_CLASSES), n, p=VAR_PROBS)
        cls[:5] = np.arange(5)  # every field holds each class
        f2 = np.where(cls == 4, rng.uniform(400.0, 4000.0, n), f2)  # fading_negative: measurable
        spec = rng.choice(2, n)  # 0 power law, 1 blackbody
        alpha = rng.uniform(-2.0, 1.0, n)
        temp = 10 ** rng.uniform(3.3, 4.0, n)
        has_line = rng.uniform(0, 1, n) < 0.2
        line = rng.choice(LINES_UM, n)
        line_amp = np.where(has_line, rng.uniform(0.3, 1.5, n), 0.0)
        t_lo, t_hi = f["t_lo"], f["t_hi"]
        amp = np.select([cls == 1, cls == 2, cls == 3], [rng.uniform(0.05, 0.5, n), rng.uniform(1.0, 8.0, n),
                                                         rng.uniform(-0.6, 0.6, n)], 0.0)
        period = rng.uniform(2.0, 30.0, n)
        phase = rng.uniform(0, 2 * np.pi, n)
        t0 = np.where(cls == 2, rng.uniform(t_lo, t_hi, n), t_lo)
        tau = np.where(cls == 2, rng.uniform(3.0, 20.0, n), 1.0)
        # fading_negative: linear fade crossing zero at 45-75 % of the window, ending near -0.4
        t_cross = t_lo + rng.uniform(0.45, 0.75, n) * (t_hi - t_lo)
        tau = np.where(cls == 4, t_cross - t_lo, tau)
        pm = rng.uniform(0, 1, n) < 0.04
        pmra = np.where(pm, rng.normal(0, 80, n), 0.0)
        pmdec = np.where(pm, rng.normal(0, 80, n), 0.0)
        ids = np.arange(n, dtype=np.int64) + 1 + (fi + 1) * 1_000_000
        parts.append(pl.DataFrame({
            "source_id": ids, "ra": ra, "dec": dec, "pmra": pmra, "pmdec": pmdec,
            "ref_epoch": np.full(n, REF_EPOCH), "var_class": np.array(VAR_CLASSES)[cls], "field": [f["name"]] * n,
            "flux_2um": f2, "spec_kind": np.where(spec == 0, "powerlaw", "blackbody"), "alpha": alpha,
            "temperature": temp, "line_um": np.where(has_line, line, np.nan), "line_amp": line_amp,
            "var_amp": amp, "var_period": period, "var_phase": phase, "var_t0": t0, "var_tau": tau,
        }))
    return pl.concat(parts)


class Sky:
    """Vectorised truth over a source table (see module docstring)."""

    def __init__(self, sources: pl.DataFrame) -> None:
        self.sources = sources
        order = np.argsort(sources["source_id"].to_numpy())
        self._ids = sources["source_id"].to_numpy()[order]
        self._order = order
        cols = ["flux_2um", "alpha", "temperature", "line_um", "line_amp", "var_amp", "var_period",
                "var_phase", "var_t0", "var_tau"]
        self._p = {c: sources[c].to_numpy() for c in cols}
        self._kind = (sources["spec_kind"] == "blackbody").to_numpy()
        self._cls = sources["var_class"].replace_strict({c: i for i, c in enumerate(VAR_CLASSES)},
                                                        return_dtype=pl.Int8).to_numpy()

    def index(self, source_id) -> np.ndarray:
        """Row indices of ``source_id`` (array-like); KeyError for unknown ids."""
        sid = np.asarray(source_id, dtype=np.int64)
        pos = np.searchsorted(self._ids, sid)
        pos = np.clip(pos, 0, len(self._ids) - 1)
        if np.any(self._ids[pos] != sid):
            raise KeyError(f"unknown source_id(s): {np.asarray(sid)[self._ids[pos] != sid][:5].tolist()}")
        return self._order[pos]

    def flux_by_index(self, idx: np.ndarray, wavelength_um, mjd) -> np.ndarray:
        """Truth flux (µJy) for row indices ``idx`` (broadcast with λ µm and MJD)."""
        idx, lam, t = np.broadcast_arrays(np.asarray(idx), np.asarray(wavelength_um, float), np.asarray(mjd, float))
        p = {k: v[idx] for k, v in self._p.items()}
        pl_shape = (lam / 2.0) ** p["alpha"]
        x, x2 = _H_C_OVER_K / (lam * p["temperature"]), _H_C_OVER_K / (2.0 * p["temperature"])
        bb = (2.0 / lam) ** 3 * np.expm1(x2) / np.expm1(x)
        shape = np.where(self._kind[idx], bb, pl_shape)
        line = np.where(np.isnan(p["line_um"]), 0.0, p["line_amp"] * np.exp(
            -0.5 * ((lam - np.nan_to_num(p["line_um"])) / (0.01 * np.nan_to_num(p["line_um"], nan=1.0))) ** 2))
        cls = self._cls[idx]
        dt = t - p["var_t0"]
        per = 1 + p["var_amp"] * np.sin(2 * np.pi * dt / p["var_period"] + p["var_phase"])
        rise = np.where(dt < 0, np.exp(-0.5 * (dt / 0.7) ** 2), 1.0)
        decay = np.where(dt > 0, np.exp(-np.clip(dt, 0, None) / p["var_tau"]), 1.0)
        burst = 1 + p["var_amp"] * rise * decay
        trend = 1 + p["var_amp"] * dt / 365.0
        fade = 1 - dt / p["var_tau"]
        v = np.select([cls == 1, cls == 2, cls == 3, cls == 4], [per, burst, trend, fade], 1.0)
        return p["flux_2um"] * (shape + line) * v

    def truth_flux(self, source_id, wavelength_um, mjd) -> np.ndarray:
        """Truth flux density (µJy) of ``source_id`` at λ (µm) and time (MJD), broadcast."""
        return self.flux_by_index(self.index(source_id), wavelength_um, mjd)

    def positions(self, idx: np.ndarray, mjd: float) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) deg of rows ``idx`` at ``mjd`` with linear proper motion from ``ref_epoch``."""
        s = self.sources
        ra, dec = s["ra"].to_numpy()[idx], s["dec"].to_numpy()[idx]
        pmra, pmdec = s["pmra"].to_numpy()[idx], s["pmdec"].to_numpy()[idx]
        dt_yr = (2000.0 + (mjd - 51544.5) / 365.25) - s["ref_epoch"].to_numpy()[idx]
        dec_t = dec + pmdec * dt_yr / 3.6e6
        ra_t = ra + pmra * dt_yr / 3.6e6 / np.cos(np.radians(dec))
        return ra_t % 360.0, dec_t
