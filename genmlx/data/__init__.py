"""Data files shipped with genmlx (``digits.csv.gz``: the 1797 UCI optdigits, 8×8 pixels
with intensities 0..16, then the label). Loaders live in :mod:`genmlx.harness.data`."""
