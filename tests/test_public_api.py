"""The public face: about ten names, functions even after their submodules are imported."""

import subprocess
import sys


def test_public_names_are_functions_even_after_submodule_import():
    code = ("import spxframe, spxframe.planner, spxframe.fetcher, spxframe.photometry, spxframe.archive, "
            "spxframe.science, spxframe.sizes; "
            "import inspect; "
            "assert all(inspect.isfunction(getattr(spxframe, n)) for n in "
            "('lightcurves','observations','plan','fetch','measure','parse_cutout_size','parse_cutout_center','read',"
            "'spectra','variability','to_lightcurve')); "
            "assert len(spxframe.__all__) <= 13; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_logging_setup_at_import():
    code = ("import logging, spxframe; root = logging.getLogger(); "
            "assert not root.handlers, root.handlers; "
            "assert all(isinstance(h, logging.NullHandler) for h in logging.getLogger('spxframe').handlers); "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
