"""The ``medfm`` command line (typer). Thin: it parses, validates and calls the library."""

__all__: list[str] = []
