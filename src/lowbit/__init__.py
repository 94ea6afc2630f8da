"""lowbit: low-bit LLM quantization methods as first-class Hugging Face transformers quantizers.

`import lowbit` registers every lowbit method with transformers. Processes that never import lowbit
get the same registration from `_lowbit_autoregister`, which the installed `.pth` file hooks in.
Each method's config and quantizer (`lowbit.HqqConfig`, `lowbit.HqqHfQuantizer`, ...) are exported
from its declaration in `registry`. `lowbit.export` writes a lowbit checkpoint for llama.cpp (GGUF) or
vLLM (compressed-tensors).
"""
__version__ = "0.1.0"

import transformers.quantizers.auto  # noqa: F401  (with the .pth hook installed, this already registers)

from .registry import methods, register_all

register_all()

from .formats import export  # noqa: E402
from .kvcache import QuantizedKVCache  # noqa: E402
from .modules import Nvfp4Linear, QuantLinear  # noqa: E402

_declared = [cls for m in methods().values() for cls in (m.config, m.quantizer)]
globals().update({cls.__name__: cls for cls in _declared})

__all__ = ["__version__", *sorted(cls.__name__ for cls in _declared), "Nvfp4Linear", "QuantLinear",
           "QuantizedKVCache", "export", "methods", "register_all"]
