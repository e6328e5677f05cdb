"""deploy/transcripts.py: reading the README's examples and recording them again (with commands
that need no server)."""

from __future__ import annotations

import pytest

from deploy.transcripts import README, examples, record

TEXT = """# x

### Transcripts

```console
$ echo one \\
    two
stale
$ printf 'a\\nb'
```

```python
print("é 🌟")
```

```text
stale
```

## Next

```console
$ echo not an example
```
"""


def test_record_reruns_every_example_and_keeps_the_rest():
    out = record(TEXT)
    assert [(e.kind, e.output) for e in examples(out)] == [("shell", "one two"), ("shell", "a\nb"),
                                                          ("python", "é 🌟\n")]
    assert examples(out)[0].command_line == "echo one two"
    assert out.split("## Next")[1] == TEXT.split("## Next")[1] and out.startswith("# x\n\n### Transcripts\n")
    assert record(out) == out


def test_the_readme_has_transcripts_and_no_section_is_an_error():
    assert {e.kind for e in examples(README.read_text())} == {"shell", "python"}
    with pytest.raises(ValueError, match="Transcripts"):
        examples("# no transcripts\n")
