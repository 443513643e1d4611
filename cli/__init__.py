"""The `adaptune` command line: thin Typer commands over the adaptune library."""
