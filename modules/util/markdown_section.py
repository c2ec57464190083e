"""Replace a generated section of a Markdown file between HTML-comment markers."""

from __future__ import annotations

from pathlib import Path

from modules.util.atomic import atomic_write_text


def replace_section(path: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- name:start -->` and `<!-- name:end -->`, appending if absent."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    atomic_write_text(path, text)


BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def report_benchmark(text: str, *, section: str, write: bool) -> None:
    """Print a benchmark's section and, with `write`, record it in docs/benchmarks.md (found
    from this file, so a benchmark started from any folder updates the project's copy)."""
    print(text)
    if write:
        replace_section(BENCHMARKS_MD, section, text)
