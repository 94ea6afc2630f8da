"""The lowbit methods known to transformers, by `quant_method`."""


def methods() -> dict:
    from .arhq import ArhqConfig, ArhqHfQuantizer
    from .householder import HouseholderConfig, HouseholderHfQuantizer
    from .hqq import HqqConfig, HqqHfQuantizer
    from .quarot import QuaRotConfig, QuaRotHfQuantizer

    return {HqqConfig.quant_method: (HqqConfig, HqqHfQuantizer),
            QuaRotConfig.quant_method: (QuaRotConfig, QuaRotHfQuantizer),
            ArhqConfig.quant_method: (ArhqConfig, ArhqHfQuantizer),
            HouseholderConfig.quant_method: (HouseholderConfig, HouseholderHfQuantizer)}


def register_all() -> None:
    """Register every lowbit method with transformers; a no-op for names already registered."""
    from transformers.quantizers import auto

    for name, (config_cls, quantizer_cls) in methods().items():
        if name not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            auto.register_quantization_config(name)(config_cls)
        if name not in auto.AUTO_QUANTIZER_MAPPING:
            auto.register_quantizer(name)(quantizer_cls)
