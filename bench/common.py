"""What the benchmark scripts share: peak-memory probes (Linux) and writing their BENCHMARKS.md section."""

from __future__ import annotations

import re
from pathlib import Path


def status_bytes(field: str) -> int:
    """A byte count from ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its high-water mark)."""
    with open("/proc/self/status") as f:
        found = re.search(field + r":\s+(\d+) kB", f.read())
    if found is None:  # pragma: no cover - every Linux has both fields
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(found.group(1)) * 1024


def reset_peak() -> int:
    """Reset the resident high-water mark to the current size (Linux); returns the current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def replace_section(path: Path, header: str, lines: list[str]) -> None:
    """Swap the section starting with ``header`` (up to the next ``## ``) for ``lines``; append if absent."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = "\n".join(lines) + "\n"
    start = text.find("\n" + header)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + block + ("" if end < 0 else text[end:])
    path.write_text(text, encoding="utf-8")
