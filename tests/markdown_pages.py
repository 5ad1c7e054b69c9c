"""Reading Markdown pages (the README, the user guide) as tests need them.

Shared by tests/test_readme.py and tests/test_docs.py: the page's ```python
blocks, its headings' anchors, and running a block as a reader would.
"""

import importlib.util
import re
import socket

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def heading_anchors(path):
    """The anchors of a Markdown page's headings (MyST's and GitHub's slugs agree on these)."""
    anchors = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            title = heading.group(1).strip().lower().replace("`", "")
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def local_links(text):
    """(target, anchor) of each relative Markdown link: ``[text](target#anchor)``."""
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        links.append((path, anchor))
    return links


def run_block(code, filename, tmp_path, monkeypatch):
    """Run one block in a fresh namespace, in a scratch directory.

    A block that starts a process group gets a group of one on a free port;
    the variables it reads are set through monkeypatch, so none of them
    outlives the test (a leaked RANK makes later torchrun-aware scripts wait
    for a rendezvous that never comes).
    """
    if re.search(r"^\s*import torch|^\s*import fastbn\.torch", code, re.MULTILINE):
        if not HAS_TORCH:
            pytest.skip("needs torch")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    if "init_process_group" in code:
        group_of_one = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for key, value in group_of_one.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    namespace = {"__name__": filename.replace("/", "_").replace(" ", "_")}
    exec(compile(code, filename, "exec"), namespace)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
