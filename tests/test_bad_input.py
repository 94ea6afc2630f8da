"""Every documented bad input fails with a clear error, before any work, leaving nothing on disk."""
import json

import pytest
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.cli import main


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, r"bits must be one of \[2, 3, 4, 8\], got 5"),
    ({"bits": True}, r"bits must be one of"),
    ({"group_size": 0}, r"group_size must be one of \[32, 64, 128, 256\], got 0"),
    ({"group_size": 48}, r"group_size must be one of \[32, 64, 128, 256\], got 48"),
    ({"nbits": 4}, r"unknown parameter\(s\) \['nbits'\]; allowed: \['bits', 'group_size', 'modules_to_not_convert', 'zero_point'\]"),
    ({"modules_to_not_convert": "lm_head"}, r"modules_to_not_convert must be a list"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.HqqConfig(**kwargs)


def test_model_without_linear_layers_to_quantize(tiny_llama):
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=lowbit.HqqConfig(
            modules_to_not_convert=["lm_head", "model"]))


def _cli(*args):
    return main(["quantize", "--method", "hqq", "-q", *args])


@pytest.mark.parametrize("args,match", [
    (["--bits", "5"], "bits must be one of"),
    (["--group-size", "48"], "group_size must be one of"),
    (["--group-size", "0"], "group_size must be one of"),
])
def test_cli_rejects_settings_before_any_work(tiny_llama, tmp_path, capsys, args, match):
    dst = tmp_path / "out"
    assert _cli("--src", str(tiny_llama), "--dst", str(dst), *args) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_src(tmp_path, capsys):
    assert _cli("--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "out")) == 2
    assert "--src" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_existing_dst_needs_overwrite(tiny_llama, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert _cli("--src", str(tiny_llama), "--dst", str(dst)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert _cli("--src", str(tiny_llama), "--dst", str(dst), "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()


def test_failure_while_writing_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from lowbit import checkpoint

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "render_model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _cli("--src", str(tiny_llama), "--dst", str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_documented_folder(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--method", "hqq", "--src", str(tiny_llama), "--bits", "3", "--group-size", "32",
                 "--keep-lm-head-fp16"]) == 0
    out = tmp_path / f"{tiny_llama.name}-HQQ_w3_g32_headfp16"
    assert "HQQ done" in capsys.readouterr().out
    meta = json.loads((out / "quantization_metadata.json").read_text())
    assert meta["method"] == "lowbit_hqq" and meta["settings"]["bits"] == 3
    assert set(meta["versions"]) >= {"lowbit", "torch", "transformers"}
    assert len(meta["layers_quantized"]) == 14 and meta["layers_kept"] == ["lm_head"]
    assert meta["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    card = (out / "README.md").read_text()
    assert "HQQ" in card and "`bits` | `3`" in card and "{" not in card.split("```")[0]
    assert (out / "tokenizer.json").exists()


@pytest.fixture
def saved(tiny_llama, tmp_path):
    out = tmp_path / "q"
    AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=lowbit.HqqConfig()).save_pretrained(out)
    return out


def test_truncated_checkpoint_fails_loudly(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="truncated|incomplete|Error"):
        AutoModelForCausalLM.from_pretrained(saved)


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_quantized_tensor_fails_loudly(saved):
    _rewrite(saved / "model.safetensors", lambda t: t.pop("model.layers.0.mlp.down_proj.qweight"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.0.mlp.down_proj.qweight'"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_reshaped_quantized_tensor_fails_loudly(saved):
    def edit(t):
        t["model.layers.1.self_attn.q_proj.scale_offset"] = t["model.layers.1.self_attn.q_proj.scale_offset"][:1]
    _rewrite(saved / "model.safetensors", edit)
    with pytest.raises(ValueError, match="q_proj.scale_offset"):
        AutoModelForCausalLM.from_pretrained(saved)
