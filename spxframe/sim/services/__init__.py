"""The simulated archive's HTTP services on 127.0.0.1: ``server`` (``serve``, ``Archive``, the CLI
``main``), ``handler`` (routing, streaming, faults, logging), ``tap`` / ``tapweb`` (TAP sync and
async), ``vo`` (SIA2, DataLink), ``tables`` (the TAP schema built from the observations),
``votable`` (VOTable writer) and ``faults`` (injected failures). Serves a ``world.Universe``;
queries run on ``spxframe.sim.adql``.
"""
