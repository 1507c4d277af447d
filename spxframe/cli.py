"""``spxframe`` command line, mirroring the Python API.

    spxframe lightcurves CATALOG --cutout-size 200px --out DIR|URL [--cache-dir DIR] [--bands D1,D2]
                                 [--archive URL] [--access auto|cutout|range|full] [--time MJD0,MJD1]
    spxframe plot DIR SOURCE_ID [--png PATH] [--band D1] [--channel K]
    spxframe export DIR --csv [-o FOLDER]
    spxframe clean DIR [--parts] [--dry-run]
    spxframe spectra DIR [-o FOLDER]        spxframe variability DIR [-o FOLDER]
    spxframe sim serve [--port P] [--seed S]
    spxframe demo [--out DIR] [--sources N]
    spxframe --version

Exit codes: 0 success, 2 bad input (the message names the column or value), 3 the archive
failed or could not be reached (the message carries the URL and a hint), 130 interrupted
(rerun the same command to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_ARCHIVE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Defaults(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _lightcurves_parser(sub) -> None:
    lc = sub.add_parser("lightcurves", help="measure every SPHEREx image of every catalog source",
                        formatter_class=_Defaults)
    lc.add_argument("catalog", help="Parquet or CSV file with source_id, ra, dec (deg, ICRS); "
                                    "optional pmra, pmdec (mas/yr), ref_epoch (Julian year)")
    lc.add_argument("--cutout-size", default="200px", metavar="SIZE",
                    help="cutout size, IRSA grammar: '200px', '3arcmin', '0.1' (deg), '200,400px'; "
                         "'none' fetches only what the measurement needs (a 25 px box); 'full' whole images")
    lc.add_argument("--cutout-center", default=None, metavar="CENTER", help="custom centre 'ra,dec' (deg) or 'x,y px'")
    lc.add_argument("--out", default="spxframe_out",
                    help="output folder or fsspec URL, e.g. s3://bucket/run (rerun the same one to resume)")
    lc.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="local folder for the fetched files (default: OUT; ~/.cache/spxframe when OUT is a URL)")
    lc.add_argument("--bands", default=None, metavar="D1,D2",
                    help="comma-separated detectors, e.g. D1,D2 (default: all six)")
    lc.add_argument("--time", default=None, metavar="MJD0,MJD1", help="MJD range 'start,end' (UTC) (default: all)")
    lc.add_argument("--releases", default=None, metavar="QR2,QR3",
                    help="archive releases to read, e.g. qr2 (default: every release this version reads)")
    lc.add_argument("--refresh", action="store_true",
                    help="query the archive again even if OUT holds a recent observations table")
    lc.add_argument("--no-gain-correction", action="store_true",
                    help="do not bring QR2 images onto the R7 gains (the l3_flux_corrections product)")
    lc.add_argument("--archive", default=None, metavar="URL",
                    help="archive base URL (default: IRSA; e.g. the URL `spxframe sim serve` prints)")
    lc.add_argument("--access", default="auto", choices=["auto", "cutout", "range", "full"],
                    help="how pixels are fetched: cost model, IBE cutouts, cloud byte ranges, or whole files")
    lc.add_argument("--aperture-radius", type=float, default=2.0, metavar="PIX",
                    help="aperture radius in pixels (6.15 arcsec each)")
    lc.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                    help="cap on concurrent transfers per host")
    lc.add_argument("--plots", type=int, default=10, metavar="N", help="number of sources to plot into OUT/plots")
    lc.add_argument("--no-progress", action="store_true", help="no progress bars")
    lc.add_argument("--dry-run", action="store_true",
                    help="plan only: print what the run would fetch (requests, bytes, time, disk), write only "
                         "OUT/run.json, send no file, cutout or cloud request")


def _parser() -> argparse.ArgumentParser:
    from spxframe._version import __version__

    p = argparse.ArgumentParser(prog="spxframe", description="SPHEREx light curves and spectra for whole catalogs.")
    p.add_argument("--version", action="version", version=f"spxframe {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    _lightcurves_parser(sub)

    pp = sub.add_parser("plot", help="plot one source's per-band light curves and spectrum from a run",
                        formatter_class=_Defaults)
    pp.add_argument("out", help="output folder of a run")
    pp.add_argument("source_id", help="the source's id")
    pp.add_argument("--png", default=None, help="PNG path (default: OUT/plots/source_<id>.png)")
    pp.add_argument("--band", action="append", default=None, help="band to draw, e.g. D1 (repeatable; default: all)")
    pp.add_argument("--channel", type=int, default=None, help="only this spectral channel (0-16) of each band")

    ex = sub.add_parser("export", help="write one CSV light curve per source", formatter_class=_Defaults)
    ex.add_argument("out", help="output folder (or URL) of a run")
    ex.add_argument("--csv", action="store_true", required=True,
                    help="CSV files with obs_id, mjd, flux, flux_error (µJy), mag_ab, mag_ab_error, wavelength, "
                         "bandwidth (µm), band, flag, snr, ... and the good-data mask (quality, good)")
    ex.add_argument("-o", "--output", default=None, help="folder for the CSV files (default: OUT/lightcurves)")

    cl = sub.add_parser("clean", help="delete the fetched-file cache (data/, psf/) of a run or cache folder",
                        formatter_class=_Defaults)
    cl.add_argument("path", help="a run's output folder or a --cache-dir (e.g. ~/.cache/spxframe)")
    cl.add_argument("--parts", action="store_true",
                    help="also delete parts/ (per-cell results: a rerun then measures everything again)")
    cl.add_argument("--dry-run", action="store_true", help="only report what would be deleted")

    for kind, what in (("spectra", "per-source spectra (one row per source and channel)"),
                       ("variability", "per-source variability measures that know the spectrum")):
        sc = sub.add_parser(kind, help=f"{what} from a finished run, into OUT/{kind}.parquet",
                            formatter_class=_Defaults)
        sc.add_argument("out", help="output folder of a run")
        sc.add_argument("-o", "--output", default=None, help="folder for the Parquet file (default: OUT)")

    sim = sub.add_parser("sim", help="the simulated IRSA archive")
    simsub = sim.add_subparsers(dest="sim_command", required=True)
    sv = simsub.add_parser("serve", help="serve the simulated archive on 127.0.0.1 until Ctrl-C",
                           formatter_class=_Defaults)
    sv.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    sv.add_argument("--seed", type=int, default=1, help="seed of the simulated sky and survey")

    dm = sub.add_parser("demo", help="run the whole job on the simulated archive", formatter_class=_Defaults)
    dm.add_argument("--out", default="spxframe_out", help="output folder")
    dm.add_argument("--sources", type=int, default=300, help="number of simulated sources")
    dm.add_argument("--seed", type=int, default=1, help="seed of the simulated sky")
    return p


def _split(option: str, value: str | None, kind=str) -> list | None:
    if not value:
        return None
    try:
        return [kind(x.strip()) for x in value.split(",")]
    except ValueError:
        raise ValueError(f"{option} {value!r}: expected comma-separated {kind.__name__} values") from None


def _lightcurves(a: argparse.Namespace) -> int:
    import spxframe

    size = None if str(a.cutout_size).lower() in ("full", "none") else a.cutout_size
    access = "full" if str(a.cutout_size).lower() == "full" else a.access
    time = _split("--time", a.time, float)
    if time is not None and len(time) != 2:
        raise ValueError(f"--time {a.time!r}: expected 'start,end' in MJD")
    releases = _split("--releases", a.releases)
    phot = spxframe.lightcurves(a.catalog, size, cutout_center=a.cutout_center, bands=_split("--bands", a.bands),
                                time=tuple(time) if time else None, access=access, output_dir=a.out,
                                releases=[r.lower() for r in releases] if releases else None, refresh=a.refresh,
                                gain_correction=not a.no_gain_correction,
                                cache_dir=a.cache_dir, archive=a.archive, progress=not a.no_progress,
                                aperture_radius=a.aperture_radius, max_concurrency=a.max_concurrency, plots=a.plots,
                                dry_run=a.dry_run)
    if a.dry_run:
        from spxframe.run.preview import report

        print(report(phot.totals))
        print(f"dry run: nothing fetched; the plan is in {a.out}/run.json")
        return EXIT_OK
    n_ok = phot.filter(phot["flux"].is_not_nan()).height if phot.height else 0
    print(f"{phot.height} rows ({n_ok} measured) for {phot['source_id'].n_unique() if phot.height else 0} "
          f"sources written to {a.out}/photometry.parquet")
    return EXIT_OK


def _plot(a: argparse.Namespace) -> int:
    from pathlib import Path

    from spxframe.plot import plot_source
    from spxframe.results import read
    from spxframe.store import is_url

    phot = read(a.out)
    plots = Path("plots") if is_url(a.out) else Path(a.out) / "plots"
    png = a.png or str(plots / f"source_{a.source_id}.png")
    plot_source(phot, a.source_id, bands=a.band, channel=a.channel, path=png)
    print(png)
    return EXIT_OK


def _export(a: argparse.Namespace) -> int:
    from spxframe.results import export_csv

    paths = export_csv(a.out, a.output)
    where = paths[0].parent if paths else a.output or a.out
    print(f"{len(paths)} CSV light curves written to {where}")
    return EXIT_OK


def _clean(a: argparse.Namespace) -> int:
    from spxframe.results import clean_cache

    removed, nbytes = clean_cache(a.path, parts=a.parts, dry_run=a.dry_run)
    verb = "would free" if a.dry_run else "freed"
    print(f"{verb} {nbytes / 1e6:.1f} MB: {', '.join(removed) if removed else 'nothing to delete'}")
    return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "lightcurves":
        return _lightcurves(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "export":
        return _export(args)
    if args.command == "clean":
        return _clean(args)
    if args.command in ("spectra", "variability"):
        from spxframe.science.cli import run_cli
        print(run_cli(args.command, args.out, args.output))
        return EXIT_OK
    if args.command == "sim":
        from spxframe.sim import main as sim_main
        return sim_main(["--port", str(args.port), "--seed", str(args.seed)]) or EXIT_OK
    if args.command == "demo":
        from spxframe.demo import run_demo
        return run_demo(output_dir=args.out, n_sources=args.sources, seed=args.seed)
    return EXIT_ERROR


def _interrupt(signum, frame) -> None:
    """Ctrl-C: the transfers being cancelled are not failures worth a line each; one message at the end."""
    logging.getLogger("spxframe").setLevel(logging.ERROR)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupt)
        except ValueError:  # pragma: no cover - not the main thread
            pass
    from spxframe.errors import ArchiveError, InputError

    try:
        return _dispatch(args)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
