"""The README's config tables match the schema (regenerate with `python tests/test_readme.py`), and
the commands it names exist."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cli import markdown_key_table  # noqa: E402

HARNESS_SECTIONS = ("task", "seed", "output_dir", "resume", "resume_changes", "init_from", "trainer", "optim", "sched", "ema", "checkpoint", "log")
TABLES = {
    "harness": lambda: markdown_key_table("gwi", HARNESS_SECTIONS),
    "gwi": lambda: markdown_key_table("gwi", ("data", "model", "loss")),
    "cnn": lambda: markdown_key_table("cnn", ("data", "model", "loss", "adversarial", "diagnostics")),
}
BLOCK = re.compile(r"(<!-- keys:(\w+) -->\n).*?(<!-- /keys -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(3), text)


def test_readme_config_tables_match_the_schema():
    text = (ROOT / "README.md").read_text()
    assert sorted(m.group(2) for m in BLOCK.finditer(text)) == sorted(TABLES)
    assert text == render(text), "README config tables are stale: run `python tests/test_readme.py`"


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make ([\w-]+)`", text)):
        assert re.search(rf"^{target}:", makefile, re.M), f"README names `make {target}`, the Makefile has no such target"
    for path in set(re.findall(r"\b((?:configs|bench)/[\w/.-]+\.(?:yaml|py))\b", text)):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))
    print(f"updated {readme}")
