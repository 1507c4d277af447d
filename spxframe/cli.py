"""``spxframe`` command line, mirroring the Python API.

    spxframe lightcurves CATALOG --cutout-size 200px --out DIR|URL [--cache-dir DIR] [--bands D1,D2]
                                 [--archive URL] [--access auto|cutout|range|full] [--time MJD0,MJD1]
    spxframe plot DIR SOURCE_ID [--png PATH]
    spxframe sim serve [--port P] [--seed S]
    spxframe demo [--out DIR] [--sources N]

Exit codes: 0 success, 2 bad input (the message names the column or value), 3 the archive
failed or could not be reached (the message carries the URL and a hint), 130 interrupted
(rerun the same command to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_ARCHIVE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spxframe", description="SPHEREx light curves and spectra for whole catalogs.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    lc = sub.add_parser("lightcurves", help="measure every SPHEREx image of every catalog source",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lc.add_argument("catalog", help="Parquet or CSV file with source_id, ra, dec (deg, ICRS); "
                                    "optional pmra, pmdec (mas/yr), ref_epoch (Julian year)")
    lc.add_argument("--cutout-size", default="200px",
                    help="cutout size, IRSA grammar: '200px', '3arcmin', '0.1' (deg), '200,400px'; 'full' for whole images")
    lc.add_argument("--cutout-center", default=None, help="custom centre 'ra,dec' (deg) or 'x,y px'")
    lc.add_argument("--out", default="spxframe_out",
                    help="output folder or fsspec URL, e.g. s3://bucket/run (rerun the same one to resume)")
    lc.add_argument("--cache-dir", default=None,
                    help="local folder for the fetched files (default: OUT; ~/.cache/spxframe when OUT is a URL)")
    lc.add_argument("--bands", default=None, help="comma-separated detectors, e.g. D1,D2 (default all six)")
    lc.add_argument("--time", default=None, help="MJD range 'start,end' (UTC)")
    lc.add_argument("--archive", default=None, help="archive base URL (default IRSA; e.g. the URL `spxframe sim serve` prints)")
    lc.add_argument("--access", default="auto", choices=["auto", "cutout", "range", "full"],
                    help="how pixels are fetched: cost model, IBE cutouts, cloud byte ranges, or whole files")
    lc.add_argument("--aperture-radius", type=float, default=2.0, help="aperture radius in pixels (6.15 arcsec each)")
    lc.add_argument("--max-concurrency", type=int, default=None, help="cap on concurrent transfers per host")
    lc.add_argument("--plots", type=int, default=10, help="number of sources to plot into OUT/plots")
    lc.add_argument("--no-progress", action="store_true", help="no progress bars")

    pp = sub.add_parser("plot", help="plot one source's light curve and spectrum from a run")
    pp.add_argument("out", help="output folder of a run")
    pp.add_argument("source_id", help="the source's id")
    pp.add_argument("--png", default=None, help="PNG path (default OUT/plots/source_<id>.png)")

    sim = sub.add_parser("sim", help="the simulated IRSA archive")
    simsub = sim.add_subparsers(dest="sim_command", required=True)
    sv = simsub.add_parser("serve", help="serve the simulated archive on 127.0.0.1 until Ctrl-C")
    sv.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    sv.add_argument("--seed", type=int, default=1, help="seed of the simulated sky and survey")

    dm = sub.add_parser("demo", help="run the whole job on the simulated archive")
    dm.add_argument("--out", default="spxframe_out", help="output folder")
    dm.add_argument("--sources", type=int, default=300, help="number of simulated sources")
    dm.add_argument("--seed", type=int, default=1, help="seed of the simulated sky")
    return p


def _lightcurves(a: argparse.Namespace) -> int:
    import spxframe

    size = None if str(a.cutout_size).lower() in ("full", "none") else a.cutout_size
    time = tuple(float(x) for x in a.time.split(",")) if a.time else None
    bands = [b.strip() for b in a.bands.split(",")] if a.bands else None
    phot = spxframe.lightcurves(a.catalog, size, cutout_center=a.cutout_center, bands=bands, time=time,
                                access=a.access, output_dir=a.out, cache_dir=a.cache_dir, archive=a.archive,
                                progress=not a.no_progress, aperture_radius=a.aperture_radius,
                                max_concurrency=a.max_concurrency, plots=a.plots)
    n_ok = phot.filter(phot["flux"].is_not_nan()).height if phot.height else 0
    print(f"{phot.height} rows ({n_ok} measured) for {phot['source_id'].n_unique() if phot.height else 0} "
          f"sources written to {a.out}/photometry.parquet")
    return EXIT_OK


def _plot(a: argparse.Namespace) -> int:
    from pathlib import Path

    from spxframe.plot import plot_source
    from spxframe.results import read

    phot = read(a.out)
    from spxframe.store import is_url

    plots = Path("plots") if is_url(a.out) else Path(a.out) / "plots"
    png = a.png or str(plots / f"source_{a.source_id}.png")
    plot_source(phot, a.source_id, path=png)
    print(png)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from spxframe.errors import ArchiveError, InputError

    try:
        if args.command == "lightcurves":
            return _lightcurves(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "sim":
            from spxframe.sim.server import main as sim_main
            return sim_main(["--port", str(args.port), "--seed", str(args.seed)]) or EXIT_OK
        if args.command == "demo":
            from spxframe.demo import run_demo
            return run_demo(output_dir=args.out, n_sources=args.sources, seed=args.seed)
    except InputError as exc:
        print(f"spxframe: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except ArchiveError as exc:
        print(f"spxframe: archive error: {exc}", file=sys.stderr)
        return EXIT_ARCHIVE
    except (ValueError, FileNotFoundError) as exc:
        print(f"spxframe: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("spxframe: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
