"""The README's "From Python" example runs as it stands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_from_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md (From Python)", "exec"), {})
    out = capsys.readouterr().out
    auc = float(out.split()[0])
    assert 0.5 < auc < 1.0  # the simulator's funnel is learnable
    assert (tmp_path / "runs" / "from-python" / "esmm" / "model.safetensors").is_file()
    assert "p_ctcvr" in out
