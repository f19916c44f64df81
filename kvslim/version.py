"""kvslim's version, in a module of its own so that any layer can read it without
importing the package facade (``kvslim/__init__`` reaches up to ``llm``)."""

__version__ = "0.1.0"  # the same as pyproject.toml's
