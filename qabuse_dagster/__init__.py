"""qabuse: predictive abuse detection for quantum cloud APIs."""

__version__ = "0.1.0"
