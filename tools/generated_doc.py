"""The evaluation tools' one way of writing their tables into a doc: replace what lies between
the doc's GENERATED markers (or start the doc with them when it has none)."""
from __future__ import annotations

import pathlib

BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def write_generated(doc: pathlib.Path, block: str, title: str) -> None:
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        doc.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    else:
        doc.write_text(f"# {title}\n\n{BEGIN}\n{block}\n{END}\n")
    print(f"wrote {doc}")
