"""atr: keep only the image tokens that matter, at corpus scale."""

__version__ = "0.1.0"
