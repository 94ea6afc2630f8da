"""The README's two commands and its deployment commands, exactly as written, on a fresh checkout (nothing beside it is needed)."""
import re
import shlex
from pathlib import Path

from huggingface_hub import ModelCard

from lowbit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(section_title: str = "## The two commands") -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split(section_title, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.startswith("lowbit ")]


def test_the_readme_commands_run_offline_from_the_checkout(tmp_path, monkeypatch):
    commands = readme_commands()
    assert [c[1] for c in commands] == ["quantize", "eval"]
    monkeypatch.chdir(tmp_path)  # the outputs land here; the shipped files are read from the checkout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for command in commands:
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in command[1:]]
        assert main(args) == 0, command
    out = tmp_path / "stories260k-HQQ_w4_g64"  # the folder the README says the first command writes
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.eval_results[0].metric_type == "perplexity"

    # the quick start's deployment commands, on the folder the first command wrote
    deploy = [c for c in readme_commands("## Quick start in Python") if c[1] in ("export", "quantize")]
    assert [c[1] for c in deploy] == ["export", "quantize", "export"]
    for command in deploy:
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in command[1:]]
        assert main(args) == 0, command
    assert (tmp_path / "stories260k-HQQ_w4_g64.gguf").stat().st_size > 0
    assert (tmp_path / "stories260k-HQQ_w4_g64_zint-ct" / "config.json").is_file()
