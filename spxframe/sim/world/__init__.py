"""The simulated world: sky (``sky``), instrument (``instrument``), survey (``survey``), the L2
frames drawn pixel by pixel (``frame``), their FITS headers and byte layout (``headers``), the IBE
cutout grammar (``cutout``) and ``Universe``, which holds them together and serves files and
cutouts as bytes (QR3 files through ``spxframe.sim.r7``). Nothing here knows about HTTP; from the
client it imports only ``spxframe.spherex``.
"""
