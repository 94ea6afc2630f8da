"""The installed .pth hook: cheap at start-up, registers lowbit when transformers' quantizers load."""
from conftest import run_python


def test_interpreter_start_imports_neither_torch_nor_transformers():
    res = run_python("import json, sys; print(json.dumps({m: m in sys.modules for m in "
                     "('torch', 'transformers', 'lowbit', '_lowbit_autoregister')}))")
    assert res == {"torch": False, "transformers": False, "lowbit": False, "_lowbit_autoregister": True}


def test_importing_transformers_quantizers_registers_lowbit():
    res = run_python("import json\nfrom transformers.quantizers import auto\n"
                     "print(json.dumps({k: [auto.AUTO_QUANTIZATION_CONFIG_MAPPING[k].__name__, "
                     "auto.AUTO_QUANTIZER_MAPPING[k].__name__] for k in ('lowbit_hqq', 'lowbit_quarot', 'lowbit_arhq', 'lowbit_householder')}))")
    assert res == {"lowbit_hqq": ["HqqConfig", "HqqHfQuantizer"],
                   "lowbit_quarot": ["QuaRotConfig", "QuaRotHfQuantizer"],
                   "lowbit_arhq": ["ArhqConfig", "ArhqHfQuantizer"],
                   "lowbit_householder": ["HouseholderConfig", "HouseholderHfQuantizer"]}


def test_import_lowbit_after_transformers_registers_once():
    res = run_python("import json\nfrom transformers.quantizers import auto\nimport lowbit\nlowbit.register_all()\n"
                     "print(json.dumps(sorted(k for k in auto.AUTO_QUANTIZER_MAPPING if k.startswith('lowbit'))))")
    assert res == ["lowbit_arhq", "lowbit_householder", "lowbit_hqq", "lowbit_quarot"]
