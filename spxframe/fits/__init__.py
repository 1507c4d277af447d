"""One FITS model for SPHEREx files: header cards, HDU layout, celestial and spectral WCS, PSF."""
