"""Pipeline R7 (QR3) pieces of the simulated archive, as pure functions of arrays and headers, to be
wired into the world and the HTTP services (spec §3.9, §3.10, §4):

- ``bits``: the R7 FLAGS bits and their ``MSKNnnnn`` cards;
- ``rice``: FLAGS as a RICE_1 tile-compressed image with one-row tiles, made lazily (``TileTable``);
- ``epsf``: the effective-PSF library (the sim's own PSF x pixel response, 5x) and its EPSF table;
- ``mef``: R7 headers from the QR2-style ones, the 9x9 WCS-WAVE table, and ``R7File`` (byte ranges);
- ``qr3flags``: BLOOM/HALO on saturated cores, GHOST/CROSSTALK/STREAK patches near sources (with
  the light they flag), SNOWBALL and GHOST_FPA discs (``Patches``);
- ``gains``: the pre-R7 gain map f (QR2 IMAGE = R7 / f, VARIANCE / f^2);
- ``calib``: the calibration products (``l3_flux_corrections``, ``spectral_wcs``,
  ``solid_angle_pixel_map``, ``epsf``, ``average_psf``), their paths and directory listings.

Like the rest of ``spxframe.sim`` this imports only ``spxframe.spherex`` from the client.
"""
