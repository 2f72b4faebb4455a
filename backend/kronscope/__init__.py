"""KronScope: an interpretability dashboard for KronSAE sparse autoencoders."""

__version__ = "0.1.0"
