"""The benchmarks' tables: each row also printed as it is measured, so a run stopped at a time limit keeps it."""

from rich.table import Table


def add_row(table: Table, *cells: str) -> None:
    """Adds a row, and prints it at once as "column value | column value ..." (empty and "-" cells left out)."""
    table.add_row(*cells)
    print(" | ".join(f"{column.header} {cell}" for column, cell in zip(table.columns, cells) if cell not in ("", "-")), flush=True)
