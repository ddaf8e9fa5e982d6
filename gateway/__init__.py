"""Mail security gateway for French medical practices."""

__version__ = "0.1.0"
