"""The package version, in a module of its own (the capture writes it into every trace)."""
__version__ = "0.1.0"
