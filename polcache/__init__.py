"""polcache: a real-time runtime for transformer diffusion policies."""

__version__ = "0.1.0"
