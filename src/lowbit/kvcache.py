"""A KV cache that stores keys and values packed at 4 or 8 bits (QuaRot's KV quantization).

Each head's key and value vector of each token is quantized on its own (asymmetric, the range clipped
to KV_CLIP[bits] of min/max, group = head_dim), packed along head_dim, and appended: states already stored
are never re-quantized, and a step's attention sees exactly what the cache holds, in prefill as in
decode. Keys are quantized in the Hadamard basis, where RoPE's outlier channels are spread out:
`K̂ = Q(K·H)·Hᵀ`, so attention computes q·K̂ = (q·H)·Q(K·H), QuaRot's rotated-query/rotated-key
product, without touching the attention code. Values need no run-time rotation: `rotation.rotate_values`
already rotated v_proj's output per head.

`install(model, bits, rotate_keys)` makes every forward of the model use such a cache: `generate`
(whose default empty DynamicCache is swapped for one), and calls without a cache, which get a
throwaway one so that they quantize the same way.
"""
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import packing
from .hadamard import hadamard_transform
from .quantize import round_to_grid

# QuaRot's clipping ratio for 4-bit keys and values; at 8 bits clipping costs more than it saves
# (SmolLM2-135M W4A8KV8 without rotation, 2×2048 windows: 32.73 ppl clipped to 0.95, 31.73 unclipped)
KV_CLIP = {4: 0.95, 8: 1.0}


def quantize_states(x: torch.Tensor, bits: int):
    """[..., head_dim] -> packed uint8 codes [..., head_dim·bits/8] and scale/offset [..., 2] (x.dtype)."""
    xf = x.float()
    q, scale, offset = round_to_grid(xf, xf.amin(-1) * KV_CLIP[bits], xf.amax(-1) * KV_CLIP[bits], bits)
    return packing.pack(q.to(torch.uint8), bits), torch.stack([scale, offset], -1).to(x.dtype)


def dequantize_states(codes: torch.Tensor, scale_offset: torch.Tensor, bits: int) -> torch.Tensor:
    so = scale_offset.float()
    x = (packing.unpack(codes, bits).float() - 2 ** (bits - 1)) * so[..., :1] + so[..., 1:]
    return x.to(scale_offset.dtype)


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's packed keys and values, [batch, kv_heads, tokens, ·]."""

    def __init__(self, bits: int, rotate_keys: bool):
        super().__init__()
        self.bits, self.rotate_keys = bits, rotate_keys
        self.cumulative_length = 0
        self.stored = None  # {"k": codes, "k_so": scale/offset, "v": ..., "v_so": ...}

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotate_keys:
            key_states = hadamard_transform(key_states.float()).to(key_states.dtype)
        k, k_so = quantize_states(key_states, self.bits)
        v, v_so = quantize_states(value_states, self.bits)
        new = {"k": k, "k_so": k_so, "v": v, "v_so": v_so}
        if self.stored is None:
            self.stored = new
        else:
            self.stored = {name: torch.cat([self.stored[name], t], dim=-2) for name, t in new.items()}
        self.cumulative_length += key_states.shape[-2]
        keys = dequantize_states(self.stored["k"], self.stored["k_so"], self.bits)
        if self.rotate_keys:
            keys = hadamard_transform(keys.float(), inverse=True).to(self.dtype)
        return keys, dequantize_states(self.stored["v"], self.stored["v_so"], self.bits)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.stored or {}).values())

    def _map(self, fn):
        if self.stored is not None:
            self.stored = {name: fn(t) for name, t in self.stored.items()}

    def reset(self):
        self.stored, self.cumulative_length, self.is_initialized = None, 0, False

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove < 0 and self.stored is not None:
            self._map(lambda t: t[..., :tokens_to_remove, :])
            self.cumulative_length += tokens_to_remove


class QuantizedKVCache(Cache):
    """The cache of a model whose KV cache is quantized at `bits` (see the module docstring)."""

    def __init__(self, num_layers: int, bits: int, rotate_keys: bool = True):
        if bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8 for a quantized KV cache, got {bits!r}")
        super().__init__(layers=[QuantizedKVLayer(bits, rotate_keys) for _ in range(num_layers)])
        self.bits = bits

    def nbytes(self) -> int:
        """Bytes the cached keys and values occupy (codes and scales)."""
        return sum(layer.nbytes() for layer in self.layers)


def install(model, bits: int, rotate_keys: bool = True) -> None:
    """Route every forward of `model` (a *ForCausalLM) through a QuantizedKVCache."""
    decoder = model.get_decoder()
    num_layers = model.config.get_text_config().num_hidden_layers
    # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache` (the old name is a
    # deprecated alias resolved inside forward, after this hook): set the one the decoder reads
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    def use_quantized_cache(module, args, kwargs):
        given = [kwargs.pop(k) for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
        cache = given[0] if given else None
        if not isinstance(cache, QuantizedKVCache):
            if cache is not None and not (type(cache) is DynamicCache and cache.get_seq_length() == 0):
                raise ValueError(f"this model quantizes its KV cache to {bits} bits and needs a lowbit "
                                 f"QuantizedKVCache; got a filled {type(cache).__name__}. Pass no cache, "
                                 f"or lowbit.kvcache.QuantizedKVCache({num_layers}, {bits}).")
            cache = QuantizedKVCache(num_layers, bits, rotate_keys)
        kwargs[name] = cache
        return args, kwargs

    uninstall(model)
    model._lowbit_kv_hook = decoder.register_forward_pre_hook(use_quantized_cache, with_kwargs=True)


def uninstall(model) -> None:
    hook = getattr(model, "_lowbit_kv_hook", None)
    if hook is not None:
        hook.remove()
        del model._lowbit_kv_hook
