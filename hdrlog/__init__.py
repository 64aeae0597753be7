"""hdrlog: log packet header elements across a fleet of Linux hosts."""

__version__ = "0.1.0"
