"""The documentation site's sources (docs/), checked without building them.

- Every public name (``__all__``) of fastbn, fastbn.nn, fastbn.torch,
  fastbn.kernels and fastbn.reference is listed in its API page's autosummary
  tables, each of which generates a page per name, and no listed name is
  stale. ``__all__`` is read from the sources, so this needs neither Sphinx
  nor torch.
- Every ```python block of the user guide runs, as the README's do
  (tests/test_readme.py): the guide holds the long explanations that moved
  out of the README, and their code stays tested.
- The guide's links to its own pages and headings resolve; the examples'
  docstrings open with the title sphinx-gallery needs; the numbers the guide
  reports for the examples are checked in kind, as the README's were.

CI builds the site itself (``sphinx-build -W`` in .ci/run).
"""

import ast
import pathlib
import re

import pytest
from markdown_pages import heading_anchors, local_links, python_blocks, run_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDE = DOCS / "guide"
EXAMPLES = ROOT / "examples"
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()

# Module -> (its source file, the API page that documents it).
API_PAGES = {
    "fastbn": ("fastbn/__init__.py", "docs/api/fastbn.rst"),
    "fastbn.nn": ("fastbn/nn.py", "docs/api/nn.rst"),
    "fastbn.torch": ("fastbn/torch/__init__.py", "docs/api/torch.rst"),
    "fastbn.kernels": ("fastbn/kernels/__init__.py", "docs/api/kernels.rst"),
    "fastbn.reference": ("fastbn/reference.py", "docs/api/reference.rst"),
}


def public_names(source):
    """The module's ``__all__``, read from its source without importing it."""
    tree = ast.parse((ROOT / source).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{source} has no __all__")


def autosummary_entries(page):
    """(module, name, toctree) for each entry of each autosummary directive of an .rst page."""
    text = (ROOT / page).read_text()
    entries = []
    module = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        directive = re.match(r"\.\. (?:currentmodule|module):: (\S+)$", line)
        if directive:
            module = directive.group(1)
        if line.strip() != ".. autosummary::":
            continue
        toctree = None
        for body in lines[i + 1 :]:
            if body and not body.startswith("   "):
                break
            option = re.match(r"   :toctree: (\S+)", body)
            if option:
                toctree = option.group(1)
            elif body.strip() and not body.strip().startswith(":"):
                entries.append((module, body.strip(), toctree))
    return entries


@pytest.mark.parametrize("module", sorted(API_PAGES))
def test_every_public_name_has_its_api_page(module):
    source, page = API_PAGES[module]
    entries = autosummary_entries(page)
    assert entries, f"{page} lists no names"
    for entry_module, name, toctree in entries:
        assert entry_module == module, (page, name, entry_module)
        # :toctree: is what makes autosummary write the name's own page.
        assert toctree == "generated/", (page, name, "no :toctree: generated/")
    listed = [name for _, name, _ in entries]
    # A name without a page of its own (a string, not an object to introspect)
    # is described in place by a ".. data::" directive.
    listed += re.findall(r"^\.\. data:: (\S+)$", (ROOT / page).read_text(), re.MULTILINE)
    assert len(listed) == len(set(listed)), f"{page} lists a name twice"
    names = set(public_names(source))
    missing = sorted(names - set(listed))
    stale = sorted(set(listed) - names)
    assert not missing, f"public names of {module} without an API page in {page}: {missing}"
    assert not stale, f"{page} lists names that {module}.__all__ does not: {stale}"


def test_every_api_page_is_in_the_api_index():
    index = (DOCS / "api" / "index.rst").read_text()
    for _, page in API_PAGES.values():
        assert re.search(rf"^   {pathlib.Path(page).stem}$", index, re.MULTILINE), page


# The guide's pages, each in the guide's toctree.
GUIDE_PAGES = sorted(GUIDE.glob("*.md"))


def test_every_guide_page_is_in_the_guide_toctree():
    index = (GUIDE / "index.md").read_text()
    toctree = re.search(r"```\{toctree\}\n(.*?)```", index, re.DOTALL).group(1)
    listed = {line.strip() for line in toctree.splitlines() if line and not line.startswith(":")}
    assert listed == {p.stem for p in GUIDE_PAGES if p.stem != "index"}


GUIDE_BLOCKS = [
    pytest.param(page, index, id=f"{page.stem}-block{index}")
    for page in GUIDE_PAGES
    for index in range(len(python_blocks(page.read_text())))
]


def test_the_guide_has_python_blocks():
    # A change of fence style would otherwise make every block test vanish.
    assert len(GUIDE_BLOCKS) >= 10
    for page in GUIDE_PAGES:
        assert page.read_text().count("```python") == len(python_blocks(page.read_text())), page


@pytest.mark.parametrize(("page", "index"), GUIDE_BLOCKS)
def test_guide_block_runs(page, index, tmp_path, monkeypatch):
    code = python_blocks(page.read_text())[index]
    run_block(code, f"docs/guide/{page.name} python block {index}", tmp_path, monkeypatch)


@pytest.mark.parametrize("page", GUIDE_PAGES, ids=lambda p: p.name)
def test_guide_links_resolve(page):
    for path, anchor in local_links(page.read_text()):
        target = (page.parent / path).resolve() if path else page
        if "auto_examples" in path:  # written by the build, from examples/
            target = EXAMPLES / pathlib.Path(path).with_suffix(".py").name
            if target.stem == "index":
                target = EXAMPLES / "GALLERY_HEADER.rst"
        assert target.exists(), (page.name, path)
        if anchor:
            assert anchor in heading_anchors(target), (page.name, path, anchor)


def test_the_guide_and_the_readme_give_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"^```bash\n(.*?)^```", readme, flags=re.DOTALL | re.MULTILINE)
    test_command = commands.group(1).strip().splitlines()[1]
    for page in ("index.md", "contributing.md"):
        assert f"\n{test_command}\n" in (GUIDE / page).read_text(), page


GALLERY = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", GALLERY, ids=lambda p: p.name)
def test_example_opens_with_a_gallery_title(script):
    # sphinx-gallery takes the page's title from the docstring's first lines:
    # a title, underlined with "=" to its length.
    docstring = ast.get_docstring(ast.parse(script.read_text()), clean=False)
    title, underline, blank = docstring.splitlines()[:3]
    assert title and not title.endswith("."), title
    assert underline == "=" * len(title) and blank == "", script.name


def test_ci_builds_the_docs_with_warnings_as_errors():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^pip install .*\.\[docs\]", ci, re.MULTILINE)
    assert re.search(r"^sphinx-build -W --keep-going -b html docs ", ci, re.MULTILINE)


@pytest.mark.parametrize("script", ["train_digits.py", "running_stats.py"])
def test_the_guide_names_the_examples_whose_output_it_reports(script):
    # tests/test_examples.py runs each and matches what the guide reports.
    assert (EXAMPLES / script).exists()
    assert f"examples/{script}" in (GUIDE / "training.md").read_text()


def test_the_changelogs_latest_release_is_the_packages_version():
    from fastbn import __version__

    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d\d-\d\d$", CHANGELOG, re.MULTILINE)
    assert releases and releases[0] == __version__, (releases[:1], __version__)
    assert CHANGELOG.index("## [Unreleased]") < CHANGELOG.index(f"## [{__version__}]")
