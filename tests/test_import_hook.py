"""The installed .pth hook: cheap at start-up, registers lowbit when transformers' quantizers load."""
import pytest

from conftest import run_python
from lowbit.registry import methods

DECLARED = {m.quant_method: [m.config.__name__, m.quantizer.__name__] for m in methods().values()}


@pytest.mark.slow
def test_interpreter_start_imports_neither_torch_nor_transformers():
    res = run_python("import json, sys; print(json.dumps({m: m in sys.modules for m in "
                     "('torch', 'transformers', 'lowbit', '_lowbit_autoregister')}))")
    assert res == {"torch": False, "transformers": False, "lowbit": False, "_lowbit_autoregister": True}


@pytest.mark.slow
def test_importing_transformers_quantizers_registers_every_declared_method():
    res = run_python("import json, sys\nfrom transformers.quantizers import auto\n"
                     "print(json.dumps({k: [auto.AUTO_QUANTIZATION_CONFIG_MAPPING[k].__name__, "
                     "auto.AUTO_QUANTIZER_MAPPING[k].__name__] for k in auto.AUTO_QUANTIZER_MAPPING "
                     "if k.startswith('lowbit_')}))")
    assert res == DECLARED


@pytest.mark.slow
def test_import_lowbit_after_transformers_registers_once():
    res = run_python("import json\nfrom transformers.quantizers import auto\nimport lowbit\nlowbit.register_all()\n"
                     "print(json.dumps(sorted(k for k in auto.AUTO_QUANTIZER_MAPPING if k.startswith('lowbit'))))")
    assert res == sorted(DECLARED)
