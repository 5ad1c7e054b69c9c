"""The README, the landing page: its code runs and its links lead somewhere.

Every ```python block runs, in order, each in a fresh namespace, so the
documented usage cannot drift from the code. Blocks that import torch run
only where torch is installed (CI installs it). The numbers the README quotes
for an example are checked in kind where a test can do it cheaply: the
example's --quick run prints the quantities the README reports. Its relative
links (into docs/, examples/) point at files that exist, and their anchors at
headings of those files. The long explanations live in the user guide
(docs/guide/), whose blocks tests/test_docs.py runs.
"""

import pathlib
import re

import pytest
from markdown_pages import heading_anchors, python_blocks, run_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = python_blocks(README)


def test_the_readme_has_python_blocks():
    # A change of fence style would otherwise make every test below vanish.
    assert len(BLOCKS) >= 2
    assert README.count("```python") == len(BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_block_runs(index, tmp_path, monkeypatch):
    run_block(BLOCKS[index], f"README.md python block {index}", tmp_path, monkeypatch)


def test_the_readme_opens_with_the_two_commands():
    first_block = re.search(r"^```bash\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)
    lines = first_block.group(1).strip().splitlines()
    assert lines == [
        "pip install -e . && python -m fastbn.bench --quick",
        'pip install -e ".[test]" && pytest',
    ]


@pytest.mark.parametrize("script", ["train_digits.py"])
def test_the_readme_names_the_examples_whose_output_it_reports(script):
    # tests/test_examples.py runs each and matches what the readme reports.
    assert (ROOT / "examples" / script).exists()
    assert f"examples/{script}" in README


def test_the_readme_links_resolve():
    links = [
        target
        for target in re.findall(r"\]\(([^)\s]+)\)", README)
        if not re.match(r"[a-z]+:", target)
    ]
    assert any(link.startswith("docs/guide/") for link in links)
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), link
        if anchor:
            assert anchor in heading_anchors(target), link


def test_the_readme_names_the_contract_page():
    # What fastbn promises is stated on the guide's contract page (tests/test_contract.py
    # holds the bench's targets to it); the README sends its readers there.
    links = re.findall(r"\]\((docs/guide/contract\.md)(#[\w-]+)?\)", README)
    assert links, "the README does not link docs/guide/contract.md"
    for path, anchor in links:
        assert (ROOT / path).exists(), path
        assert not anchor or anchor[1:] in heading_anchors(ROOT / path), anchor
