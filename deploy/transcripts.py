"""The README's transcripts: its `### Transcripts` section shows requests to `make run` with what
they printed. This module reads them (tests/test_demo_served.py replays them against the same
set-up) and records them again when the answers legitimately change:

    make run &                      # in one shell; once it answers:
    python -m deploy.transcripts    # reruns every example, rewrites what README.md shows they printed

A curl example is a `$ ` line (with `\\` continuation lines) in a ```console block, followed by its
output; an openai-client example is a ```python block followed by a ```text block with its output.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:8000"    # where the examples send their requests: make run's address

_SECTION = re.compile(r"^### Transcripts\n(.*?)(?=^##)", re.M | re.S)
_CONSOLE = re.compile(r"^```console\n(.*?)^```\n", re.M | re.S)
_SCRIPT = re.compile(r"^```python\n(.*?)^```\n\n```text\n(.*?)^```\n", re.M | re.S)


@dataclass(frozen=True)
class Example:
    kind: str            # "shell" (a command line, curl in the README) or "python" (a script)
    code: str            # as the README shows it (a command keeps its continuation lines)
    output: str          # what the README shows it printed

    @property
    def command_line(self) -> str:
        """A shell example's command on one line."""
        return " ".join(line.rstrip("\\").strip() for line in self.code.split("\n"))


def _section(text: str) -> re.Match:
    m = _SECTION.search(text)
    if m is None:
        raise ValueError("the README has no '### Transcripts' section")
    return m


def _commands(block: str) -> list[tuple[str, str]]:
    """(command with its continuation lines, output) for each `$ ` prompt of a console block."""
    out = []
    for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
        lines = chunk.split("\n")
        n = next(i for i, line in enumerate(lines) if not line.endswith("\\"))
        out.append(("\n".join(lines[:n + 1]), "\n".join(lines[n + 1:]).strip("\n")))
    return out


def examples(text: str) -> list[Example]:
    """Every example of the README text's Transcripts section, in order."""
    section = _section(text).group(1)
    found = [(m.start(), Example("shell", cmd, out)) for m in _CONSOLE.finditer(section)
             for cmd, out in _commands(m.group(1))]
    found += [(m.start(), Example("python", m.group(1), m.group(2))) for m in _SCRIPT.finditer(section)]
    return [e for _, e in sorted(found, key=lambda p: p[0])]


def record(text: str) -> str:
    """The README text with every example run again (against make run) and its output replaced."""
    m = _section(text)

    def run(args: list[str]) -> str:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout

    def console(block: re.Match) -> str:
        body = "".join(f"$ {cmd}\n{run(['bash', '-c', cmd]).strip(chr(10))}\n" for cmd, _ in _commands(block.group(1)))
        return f"```console\n{body}```\n"

    def script(block: re.Match) -> str:
        return f"```python\n{block.group(1)}```\n\n```text\n{run([sys.executable, '-c', block.group(1)])}```\n"

    section = _SCRIPT.sub(script, _CONSOLE.sub(console, m.group(1)))
    return text[:m.start(1)] + section + text[m.end(1):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.transcripts", description=__doc__.split("\n\n")[0])
    p.add_argument("readme", type=Path, nargs="?", default=README)
    args = p.parse_args(argv)
    args.readme.write_text(record(args.readme.read_text()))
    print(f"recorded {len(examples(args.readme.read_text()))} examples in {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
