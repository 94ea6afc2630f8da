"""lowbit: low-bit LLM quantization methods as first-class Hugging Face transformers quantizers.

`import lowbit` registers every lowbit method with transformers. Processes that never import lowbit
get the same registration from `_lowbit_autoregister`, which the installed `.pth` file hooks in.
"""
__version__ = "0.1.0"

import transformers.quantizers.auto  # noqa: F401  (with the .pth hook installed, this already registers)

from .registry import register_all

register_all()

from .arhq import ArhqConfig, ArhqHfQuantizer  # noqa: E402
from .householder import HouseholderConfig, HouseholderHfQuantizer  # noqa: E402
from .hqq import HqqConfig, HqqHfQuantizer  # noqa: E402
from .kvcache import QuantizedKVCache  # noqa: E402
from .modules import Nvfp4Linear, QuantLinear  # noqa: E402
from .quarot import QuaRotConfig, QuaRotHfQuantizer  # noqa: E402

__all__ = ["__version__", "ArhqConfig", "ArhqHfQuantizer", "HouseholderConfig", "HouseholderHfQuantizer",
           "HqqConfig", "HqqHfQuantizer", "Nvfp4Linear",
           "QuaRotConfig", "QuaRotHfQuantizer", "QuantLinear", "QuantizedKVCache", "register_all"]
