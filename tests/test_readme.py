"""The README's Python examples run as written (in a temporary directory)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # later blocks use the rack the first one built
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "my-rack" / "adapters").is_dir()
    assert "stack_1" in capsys.readouterr().out
