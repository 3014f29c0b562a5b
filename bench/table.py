"""One table, two readers: printed with rich for the terminal, written as markdown to bench/results/."""

from __future__ import annotations

from pathlib import Path


def publish(path: Path, heading: str, intro: str, title: str, header: list[str], lines: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for line in lines:
        table.add_row(*line)
    Console(width=200).print(table)
    markdown = [
        f"# {heading}",
        "",
        intro,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(line) + " |" for line in lines),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(markdown))
