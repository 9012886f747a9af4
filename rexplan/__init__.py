"""rex: launch programs on many hosts from one manifest, each launch verified by a callback."""

__version__ = "0.1.0"
