"""steph: cross-cancer knowledge transfer for whole-slide-image survival prediction."""

__version__ = "0.1.0"
