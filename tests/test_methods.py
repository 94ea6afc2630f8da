"""The method declarations: one place per method, read by the registry, the CLI, the naming tag and the
model card; consistent config names; no silent fallback."""
import json
import re
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import checkpoint, cli, registry
from lowbit.base import Method, Option


def test_every_declared_method_is_registered_exported_and_has_a_cli_name():
    from transformers.quantizers import auto

    declared = registry.methods()
    assert list(declared) == list(registry.METHOD_MODULES)
    for name, m in declared.items():
        assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[m.quant_method] is m.config
        assert auto.AUTO_QUANTIZER_MAPPING[m.quant_method] is m.quantizer
        assert getattr(lowbit, m.config.__name__) is m.config and m.config.__name__ in lowbit.__all__
        assert registry.method(name) is registry.method(m.quant_method) is m


@pytest.mark.parametrize("name", ["nope", "lowbit_nope", "hqq4", ""])
def test_an_unknown_method_is_an_error(name):
    with pytest.raises(ValueError, match=r"unknown lowbit method .* known: hqq \(lowbit_hqq\), quarot"):
        registry.method(name)


def test_cli_refuses_an_unknown_method(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--method", "unknown", "--src", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'unknown'" in capsys.readouterr().err


def test_naming_tag_refuses_a_config_of_no_declared_method():
    config = types.SimpleNamespace(quant_method="lowbit_nope", bits=4, group_size=64)
    with pytest.raises(ValueError, match="unknown lowbit method 'lowbit_nope'"):
        checkpoint.naming_tag(config)


@pytest.mark.parametrize("config_cls,old,new,value", [
    (lowbit.QuaRotConfig, "w_bits", "bits", 8), (lowbit.QuaRotConfig, "a_bits", "act_bits", 8),
    (lowbit.HouseholderConfig, "w_bits", "bits", 8), (lowbit.HouseholderConfig, "a_bits", "act_bits", 4),
    (lowbit.HouseholderConfig, "max_seq_len", "seqlen", 64)])
def test_deprecated_names_warn_and_work(config_cls, old, new, value):
    with pytest.warns(DeprecationWarning, match=re.escape(f"({old}=...) is deprecated, use {new}=...")):
        config = config_cls(**{old: value})
    assert getattr(config, new) == value and old not in config.to_dict()
    with pytest.warns(DeprecationWarning, match=f"{config_cls.__name__}.{old} is deprecated"):
        assert getattr(config, old) == value
    with pytest.raises(ValueError, match=f"got both '{old}' and '{new}'"):
        config_cls(**{old: value, new: value})


def test_checkpoints_saved_with_the_old_names_still_load():
    with pytest.warns(DeprecationWarning):
        config = lowbit.QuaRotConfig.from_dict({"quant_method": "lowbit_quarot", "w_bits": 4, "a_bits": 8,
                                                "kv_bits": 8, "group_size": 32})
    assert (config.bits, config.act_bits, config.kv_bits) == (4, 8, 8)


def test_the_same_setting_has_the_same_name_in_every_config():
    fields = {m.name: set(m.config._fields) for m in registry.methods().values()}
    for name in ("w_bits", "a_bits", "max_seq_len", "nbits"):
        assert not any(name in f for f in fields.values()), name
    calibrating = [n for n, f in fields.items() if "calibration" in f]
    assert calibrating == ["quarot", "arhq", "householder"]
    assert all({"nsamples", "seqlen", "seed"} <= fields[n] for n in calibrating)


def test_needs_calibration_is_declared_by_every_config():
    assert lowbit.HqqConfig().needs_calibration is False
    assert lowbit.QuaRotConfig().needs_calibration is False
    assert lowbit.QuaRotConfig(weight_quantizer="gptq", calibration=["x"]).needs_calibration is True
    assert lowbit.ArhqConfig(decomposition="svdquant").needs_calibration is False
    assert lowbit.ArhqConfig(calibration=["x"]).needs_calibration is True
    assert lowbit.HouseholderConfig().needs_calibration is True  # on the model's own samples without data


@pytest.mark.parametrize("make", [lambda: lowbit.HqqConfig(bits=4, group_size=32),
                                  lambda: lowbit.QuaRotConfig(group_size=-1, act_bits=8, kv_bits=8)])
def test_quantizing_leaves_the_callers_config_untouched(tiny_llama, make):
    config = make()
    before = json.dumps(config.to_dict(), sort_keys=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    assert json.dumps(config.to_dict(), sort_keys=True) == before
    assert model.config.quantization_config is not config


# ---------------------------------------------------------------- a fifth method: one module plus one line

class ToyConfig(lowbit.HqqConfig):
    quant_method = "lowbit_toy"


class ToyHfQuantizer(lowbit.HqqHfQuantizer):
    pass


@pytest.fixture
def toy_method(monkeypatch):
    from transformers.quantizers import auto

    module = types.ModuleType("lowbit.toy")
    module.METHOD = Method(name="toy", config=ToyConfig, quantizer=ToyHfQuantizer, title="Toy",
                           summary="a test method.", options=(Option("--toy-bits", "bits", int, "toy bits"),),
                           tag=lambda c: f"Toy_w{c.bits}")
    monkeypatch.setitem(sys.modules, "lowbit.toy", module)
    monkeypatch.setattr(registry, "METHOD_MODULES", (*registry.METHOD_MODULES, "toy"))
    registry.register_all()
    yield module.METHOD
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("lowbit_toy", None)
    auto.AUTO_QUANTIZER_MAPPING.pop("lowbit_toy", None)


def test_a_declared_method_reaches_transformers_the_cli_and_the_card(toy_method, tiny_llama, tmp_path, monkeypatch):
    from transformers.quantizers import auto

    assert auto.AUTO_QUANTIZER_MAPPING["lowbit_toy"] is ToyHfQuantizer
    assert "--toy-bits" in cli._build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    with pytest.raises(ValueError, match="--toy-bits cannot be used with --method hqq"):
        cli._config(cli._build_parser().parse_args(["quantize", "--method", "hqq", "--src", "x", "--toy-bits", "4"]))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["quantize", "-q", "--method", "toy", "--src", str(tiny_llama), "--toy-bits", "8"]) == 0
    out = tmp_path / f"{tiny_llama.name}-Toy_w8_headfp16"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "lowbit_toy"
    assert "**Toy**: a test method." in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.config.quantization_config) is ToyConfig


# ---------------------------------------------------------------- model card

def _card(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_card_of_a_local_source_names_no_base_model_and_carries_its_license(stories, tmp_path):
    out = tmp_path / "q"
    assert cli.main(["quantize", "-q", "--method", "hqq", "--src", str(stories), "--dst", str(out)]) == 0
    card = _card(out)
    assert card.data.license == "mit"  # from examples/models/stories260k/README.md
    assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
    assert "`stories260k`" in card.text and "lowbit_hqq" in card.data.tags


def test_card_of_a_hub_source_names_it_as_base_model(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "source_license", lambda src: "apache-2.0")
    meta = {"method": "lowbit_hqq", "settings": {"bits": 4}, "source": "org/model", "base_model": "org/model",
            "license": "apache-2.0", "dtype": "bfloat16", "seconds": 1.0, "bf16_bytes": 2, "checkpoint_bytes": 1,
            "linear_bf16_bytes": 2, "linear_packed_bytes": 1, "layers_quantized": ["a"], "layers_kept": [],
            "versions": {"lowbit": "0", "torch": "0", "transformers": "0"}}
    (tmp_path / "README.md").write_text(checkpoint.render_model_card(meta, "model-HQQ_w4_g64"))
    card = _card(tmp_path)
    assert card.data.base_model == "org/model" and card.data.license == "apache-2.0"
    assert "[org/model](https://huggingface.co/org/model)" in card.text


def test_lowbit_eval_puts_its_perplexity_into_the_card(stories, tmp_path):
    out = tmp_path / "q"
    assert cli.main(["quantize", "-q", "--method", "hqq", "--src", str(stories), "--dst", str(out)]) == 0
    data = tmp_path / "text.txt"
    data.write_text("Once upon a time, there was a little girl named Lily. She liked to play outside. " * 20)
    assert cli.main(["eval", "-q", "--model", str(out), "--tasks", "ppl", "--ppl-data", str(data),
                     "--seqlen", "64"]) == 0
    meta = json.loads((out / checkpoint.METADATA_FILE).read_text())
    ppl = meta["eval"]["ppl"]["ppl"]
    [result] = _card(out).data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(ppl, abs=1e-4)
    assert result.dataset_name == str(data) and "windows of 64 tokens" in result.metric_config
    assert not list(out.glob(".*.tmp"))


def test_lowbit_eval_leaves_a_folder_it_did_not_write_alone(stories, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("Once upon a time, there was a little girl named Lily. " * 20)
    before = sorted(p.name for p in stories.iterdir())
    assert cli.main(["eval", "-q", "--model", str(stories), "--tasks", "ppl", "--ppl-data", str(data),
                     "--seqlen", "64"]) == 0
    assert sorted(p.name for p in stories.iterdir()) == before


def _benchmark(name="benchmark"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_speed_benchmark_takes_each_figure_as_the_median_over_rounds():
    speed = _benchmark("speed_benchmark")
    runs = [{"model": "m", "method": "bf16", "decode_tok_s": d, "prefill_tok_s": p, "compile_s": c}
            for d, p, c in ((20.0, 800.0, None), (9.0, 850.0, 70.0), (21.0, 300.0, 90.0))]  # one burst each
    cell = speed.median_cell(runs)
    assert cell == {"model": "m", "method": "bf16", "decode_tok_s": 20.0, "prefill_tok_s": 800.0,
                    "compile_s": 80.0, "rounds": 3}


def test_the_speed_table_shows_a_model_only_the_labels_that_measured_it():
    speed = _benchmark("speed_benchmark")
    cell = {"method": "bf16", "decode_tok_s": 10.0, "prefill_tok_s": 100.0}
    results = {"models": ["a", "b"], "labels": {"old": {"_meta": "m1", "a": [cell], "b": [cell]},
                                                 "new": {"_meta": "m2", "a": [{**cell, "decode_tok_s": 12.0}]}}}
    text = speed.table(results)
    table_a, table_b = text.split("**b**")
    assert "decode new" in table_a and "12.0 tok/s" in table_a
    assert "decode new" not in table_b and "decode old" in table_b
    assert "old: m1; new: m2" in text  # every label's provenance, under the last table


def test_the_benchmark_runs_any_declared_method_by_name():
    bench = _benchmark()
    assert bench.parse_method("hqq:bits=3,group_size=128") == ("hqq", 3, 128, {"bits": 3, "group_size": 128})
    assert bench.parse_method("quarot:rotation_method=pca")[3] == {"rotation_method": "pca"}
    assert bench.parse_method("svdquant-r128-sq-int8", smoothing=0.3) == (
        "svdquant", 4, 16, {"rank": 128, "decomposition": "svdquant", "smoothing": 0.3, "int8_runtime": True})
    with pytest.raises(ValueError, match="unknown NVFP4 method 'svdquant-r128-int8-sq'"):
        bench.parse_method("svdquant-r128-int8-sq")
    with pytest.raises(ValueError, match="unknown lowbit method 'nope'"):
        bench.parse_method("nope:bits=4")
    with pytest.raises(ValueError, match="expected field=value, got 'bits'"):
        bench.parse_method("hqq:bits")


def test_the_report_is_rebuilt_from_the_result_files_alone(tmp_path):
    import shutil

    bench = _benchmark()
    root = tmp_path
    (root / "results" / "hqq").mkdir(parents=True)
    shutil.copy(bench.ROOT / "results" / "hqq" / "results.json", root / "results" / "hqq" / "results.json")
    cells = {k: v for k, v in json.loads((root / "results" / "hqq" / "results.json").read_text()).items()
             if v["model"] in ("smollm2-135m", "qwen2.5-0.5b")}  # the original models' cells, no date recorded
    perm = {f"smollm2-135m-perm|{k.split('|')[1]}": {**v, "model": "smollm2-135m-perm", "date": "2026-12-04",
                                                     "machine": "test CPU"}
            for k, v in cells.items() if k.startswith("smollm2-135m|")}
    (root / "results" / "hqq" / "results.json").write_text(json.dumps({**cells, **perm}))
    (root / "docs").mkdir()
    block = "<!-- results:{0}:start -->\nold\n<!-- results:{0}:end -->\n"
    (root / "docs" / "hqq.md").write_text("# HQQ\n" + block.format("hqq") + "after\n")
    (root / "README.md").write_text("# r\n" + block.format("summary"))
    bench.report(root / "results", root / "docs", root / "README.md")

    page = (root / "docs" / "results.md").read_text()
    assert "## hqq" in page and "### Permuted models" in page and "### Original models" in page
    assert "Measured: 2026-12-04; machine: test CPU." in page and "Measured: not recorded" in page
    hqq_page = (root / "docs" / "hqq.md").read_text()
    assert "old" not in hqq_page and hqq_page.endswith("after\n")
    assert "| smollm2-135m-perm | lowbit-hqq-w4g64 |" in hqq_page and "| smollm2-135m |" not in hqq_page
    ppl = perm["smollm2-135m-perm|lowbit-hqq-w4g64"]["ppl"]["ppl"]
    assert f"| smollm2-135m-perm | lowbit-hqq-w4g64 | 4.50 | {ppl:.2f} (" in (root / "README.md").read_text()
    assert (root / "results" / "hqq" / "ppl_vs_bpw.png").stat().st_size > 0
