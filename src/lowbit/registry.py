"""The lowbit methods: each module below declares itself once as `METHOD` (a `base.Method`), and
everything that needs the list of methods (registration with transformers, the CLI, the naming tag,
the model card, the benchmark) reads it from here."""
import importlib

METHOD_MODULES = ("hqq", "quarot", "arhq", "householder")


def methods() -> dict:
    """{CLI name: Method}, in the order of METHOD_MODULES."""
    declared = (importlib.import_module(f"lowbit.{module}").METHOD for module in METHOD_MODULES)
    return {m.name: m for m in declared}


def method(name: str):
    """The Method with this CLI name (`hqq`) or `quant_method` (`lowbit_hqq`); anything else is an error."""
    for m in methods().values():
        if name in (m.name, m.quant_method):
            return m
    known = ", ".join(f"{m.name} ({m.quant_method})" for m in methods().values())
    raise ValueError(f"unknown lowbit method {name!r}; known: {known}")


def register_all() -> None:
    """Register every lowbit method with transformers; a no-op for names already registered."""
    from transformers.quantizers import auto

    for m in methods().values():
        if m.quant_method not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            auto.register_quantization_config(m.quant_method)(m.config)
        if m.quant_method not in auto.AUTO_QUANTIZER_MAPPING:
            auto.register_quantizer(m.quant_method)(m.quantizer)
