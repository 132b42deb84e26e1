"""flight-lakehouse: a small lakehouse behind one Apache Arrow Flight server."""

__version__ = "0.1.0"
