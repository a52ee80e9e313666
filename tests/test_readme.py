"""The README's usage example is examples/quickstart.py, and it runs."""

import ast
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_is_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks and blocks[0] == (ROOT / "examples" / "quickstart.py").read_text()


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"`bash {script}`" in readme and (ROOT / script).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    metrics = ast.literal_eval(printed.strip().splitlines()[-1])  # the dict printed by the example
    assert metrics["eval_loss_kd"] < 5 and metrics["eval_perplexity"] < 100
    assert (tmp_path / "distilled-student" / "model.safetensors").is_file()
    assert sum(v for k, v in metrics.items() if k.startswith("eval_teacher_weight/")) == pytest.approx(1, abs=1e-5)


def test_readme_and_docs_links_resolve():
    """Every relative link of the README and the docs pages names a file that exists (and a heading, if it has one)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+\.md|[^):]*#[^)]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name} links to a missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.name} links to a missing heading {target}"
