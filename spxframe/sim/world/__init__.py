"""The simulated world: sky (``sky``), instrument (``instrument``), survey (``survey``), the L2
frames drawn pixel by pixel (``frame``), their FITS headers and byte layout (``headers``), the IBE
cutout grammar (``cutout``) and ``Universe``, which holds them together and serves files and
cutouts as bytes. Nothing here knows about HTTP; it imports only ``spxframe.spherex``.
"""
