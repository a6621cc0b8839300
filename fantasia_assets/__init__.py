"""fantasia-assets: GO annotation transfer by nearest neighbours in embedding space."""

__version__ = "0.1.0"
