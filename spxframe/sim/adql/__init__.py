"""The ADQL subset of the simulated TAP service: ``parser`` (text to query tree), ``evaluate``
(the engine: joins, filters), ``functions`` (expressions), ``project`` (SELECT lists, ORDER BY),
``values`` (tables, relations, geometry values) and ``geom`` (spherical polygons and distances).

Imports go one way: evaluate -> project -> functions -> values -> geom; parser underneath.
"""
