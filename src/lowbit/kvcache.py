"""A KV cache that stores keys and values packed at 4 or 8 bits (QuaRot's KV quantization).

Each head's key and value vector of each token is quantized on its own (asymmetric, the range clipped
to KV_CLIP[bits] of min/max, group = head_dim), packed along head_dim, and appended: states already stored
are never re-quantized, and a step's attention sees exactly what the cache holds, in prefill as in
decode. The cache hands attention the dequantized keys, so any fixed invertible map of the keys may be
applied before quantizing and undone after, without touching the attention code; two are:
- per-channel normalisation, `(K − c)/s`, with c and s per layer and head from the weights alone
  (`key_statistics`). A large key bias (Qwen2's) survives RoPE in the slow channels as an offset
  shared by every token, and a few channels are much wider than the rest: without the normalisation
  a token's 16 levels go to both, and 4-bit keys lose the attention pattern.
- a Hadamard over head_dim, where RoPE's outlier channels are spread out: `K̂ = Q(K·H)·Hᵀ`, so attention
  computes q·K̂ = (q·H)·Q(K·H), QuaRot's rotated-query/rotated-key product.
Values need no run-time rotation: `rotation.rotate_values` already rotated v_proj's output per head.

`install(model, bits, rotate_keys)` makes every forward of the model use such a cache: `generate`
(whose default empty DynamicCache is swapped for one, and an empty StaticCache for a static one of the
same length), and calls without a cache, which get a throwaway one so that they quantize the same way.
The dynamic layers (`QuantizedKVLayer`) append to buffers grown CAPACITY_BLOCK tokens at a time, and
dequantize into scratch buffers their cache's layers share (`DequantizedScratch`), so that an eager decode
step neither copies nor allocates anything the size of the cache. The static layers
(`StaticQuantizedKVLayer`) preallocate the packed codes and write each step in place: shapes never change,
so `torch.compile` (`generate(..., cache_implementation="static")`) compiles the decode step once.
"""
import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

from . import packing
from .hadamard import hadamard_transform
from .quantize import round_to_grid

# The positions over which k_proj's bias is averaged after RoPE to give the keys' centre: any centre
# is exact (it is added back), this only picks the context whose offset it removes best
KEY_CENTRE_POSITIONS = 4096
# QuaRot's clipping ratio for 4-bit keys and values; at 8 bits clipping costs more than it saves
# (8 bits resolve the range without it, and the clipped outliers are what attention attends to)
KV_CLIP = {4: 0.95, 8: 1.0}
# Tokens a dynamic layer's packed buffers (and the dequantized scratch) grow by: a decode step writes its
# token in place instead of concatenating the whole cache, at most this many tokens allocated unused
CAPACITY_BLOCK = 256


def _capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_BLOCK) * CAPACITY_BLOCK


class DequantizedScratch:
    """The buffers a dynamic cache's layers dequantize into, shared by its layers (one layer's keys and
    values in the compute dtype, whatever the cache's length): attention reads a layer's states before the
    next layer's update overwrites them, and a decode step allocates nothing the size of the cache (freed
    and re-faulted every step otherwise: several times the dequantization itself on a long context)."""

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous [*shape] tensor of `name`'s buffer, grown (tokens: shape[-2]) by CAPACITY_BLOCK."""
        shape = torch.Size(shape)
        numel = shape.numel()
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            capacity = numel // max(shape[-2], 1) * _capacity(shape[-2])
            buffer = self.buffers[name] = torch.empty(capacity, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _states_shape(codes: torch.Tensor, bits: int) -> tuple:
    """The shape of the states that packed `codes` hold."""
    return (*codes.shape[:-1], codes.shape[-1] * 8 // bits)


def quantize_states(x: torch.Tensor, bits: int):
    """[..., head_dim] -> packed uint8 codes [..., head_dim·bits/8] and scale/offset [..., 2] (x.dtype)."""
    xf = x.float()
    q, scale, offset = round_to_grid(xf, xf.amin(-1) * KV_CLIP[bits], xf.amax(-1) * KV_CLIP[bits], bits)
    return packing.pack(q.to(torch.uint8), bits), torch.stack([scale, offset], -1).to(x.dtype)


def dequantize_states(codes: torch.Tensor, scale_offset: torch.Tensor, bits: int, dtype: torch.dtype | None = None,
                      out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `quantize_states`, computed in float32 (in `work`, if given) and returned in `dtype`
    (default: the scales'), or written into `out`. In-place passes over a float32 copy of the codes: on
    CPU a broadcast multiply-add of integer codes converts them more slowly than a copy does, and 4-bit
    codes are written to their places as they are converted (`packing.unpack_into`)."""
    so = scale_offset.float()
    scale, offset = so[..., :1], so[..., 1:] - 2 ** (bits - 1) * so[..., :1]  # the codes' midpoint folded in
    if work is None:
        work = torch.empty(_states_shape(codes, bits), dtype=torch.float32, device=codes.device)
    x = packing.unpack_into(codes, bits, work)
    x.mul_(scale).add_(offset)
    return x.to(dtype or scale_offset.dtype) if out is None else out.copy_(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


@torch.no_grad()
def key_statistics(model) -> list:
    """Per decoder layer, (centre, scale) [kv_heads, head_dim] float32 that its keys are normalised by
    before quantization, from the weights alone (input norm, k_proj, k_norm): deterministic, no calibration.
    - centre: k_proj's bias as RoPE turns it, averaged over the first KEY_CENTRE_POSITIONS positions;
    - scale: each output channel's row norm of the input norm's scale then k_proj (times k_norm's weight
      where keys are normed),
      as an RMS over the channel's RoPE pair (i, i + head_dim/2): RoPE mixes the pair, so only their
      common scale is the same at every position."""
    text = model.config.get_text_config()
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device
    positions = torch.arange(min(KEY_CENTRE_POSITIONS, text.max_position_embeddings), device=device)[None]
    cos, sin = (t[0].float() for t in rotary(torch.zeros(1, device=device), positions))  # [positions, head_dim]
    # every basis vector times √d has RMS one, so an input norm (with any hooks around it) acts on these
    # as the linear map it applies to a typical token: through it, k_proj's weight as the residual sees it
    d = text.hidden_size
    probe = torch.eye(d, device=device) * d**0.5
    stats = []
    for layer in model.model.layers:
        attn = layer.self_attn
        k_proj, head_dim = attn.k_proj, attn.head_dim
        weight = k_proj.dequantize_weight(torch.float32) if hasattr(k_proj, "dequantize_weight") else k_proj.weight
        through = layer.input_layernorm(probe.to(weight.device)).float() / d**0.5
        rows = (weight.float() @ through.T).pow(2).sum(-1).view(-1, head_dim)  # [kv_heads, head_dim]
        norm = getattr(attn, "k_norm", None)
        if norm is not None:
            rows = rows * norm.weight.float().pow(2)
        pair = (rows[:, :head_dim // 2] + rows[:, head_dim // 2:]) / 2
        scale = pair.repeat(1, 2).sqrt().clamp_min(1e-6)
        centre = torch.zeros_like(scale)
        if k_proj.bias is not None and norm is None:
            bias, c, s = k_proj.bias.float().view(-1, 1, head_dim), cos.to(scale.device), sin.to(scale.device)
            centre = (bias * c + _rotate_half(bias) * s).mean(1)
        stats.append((centre, scale))
    return stats


class _KeyMap:
    """The invertible map of the keys around quantization (see the module docstring), shared by the
    dynamic and the static layer. `key_stats`: the (centre, scale) of `key_statistics` for this layer,
    or None to quantize the keys as they are."""

    def _init_keys(self, bits: int, rotate_keys: bool, key_stats, scratch: DequantizedScratch | None):
        self.bits, self.rotate_keys, self.key_stats = bits, rotate_keys, key_stats
        self._scratch = scratch

    def _step_scratch(self) -> DequantizedScratch | None:
        """Where an update dequantizes: the cache's scratch in eager steps; a compiled step's buffers are
        inductor's."""
        return None if torch.compiler.is_compiling() else self._scratch

    def _place_key_stats(self, key_states):
        """Take the dtype and device of the first states; the key statistics move there, and the inverse
        key map becomes one matrix per head: restoring is `K̂·M + c`, one batched matmul over the cache."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_restore = self.key_centre = None
        if self.key_stats is not None:  # [kv_heads, 1, head_dim]: broadcast over batch and tokens
            self.key_stats = tuple(t.to(key_states.device).unsqueeze(1) for t in self.key_stats)
        if self.key_stats is None and not self.rotate_keys:
            return
        heads, head_dim = key_states.shape[1], key_states.shape[-1]
        centre, scale = self.key_stats or (torch.zeros(heads, 1, head_dim, device=self.device),
                                           torch.ones(heads, 1, head_dim, device=self.device))
        inverse = torch.eye(head_dim, device=self.device)  # row j: where basis vector j goes
        if self.rotate_keys:
            inverse = hadamard_transform(inverse, inverse=True)
        # [kv_heads, head_dim, head_dim], column c scaled by s_c; in the states' dtype, as the matmul runs
        self.key_restore = (inverse * scale.float()).to(self.dtype)
        self.key_centre = centre.to(self.dtype)

    def _quantize(self, key_states, value_states) -> dict:
        """Keys and values stacked, [2, batch, kv_heads, tokens, ·]: one quantization for both."""
        codes, scale_offset = quantize_states(torch.stack([self._normalise_keys(key_states), value_states]),
                                              self.bits)
        return {"codes": codes, "scale_offset": scale_offset}

    def _dequantize(self, stored: dict, scratch: DequantizedScratch | None = None):
        """The keys and values `stored` holds, in the compute dtype: new tensors, or views of `scratch`."""
        codes, scale_offset = stored["codes"], stored["scale_offset"]
        states = work = None
        if scratch is not None:
            shape = _states_shape(codes, self.bits)
            states = scratch.get("states", shape, self.dtype, codes.device)
            work = scratch.get("float32", shape, torch.float32, codes.device)
        keys, values = dequantize_states(codes, scale_offset, self.bits, self.dtype, out=states, work=work)
        if self.key_restore is not None:
            restored = None if scratch is None else scratch.get("keys", keys.shape, self.dtype, keys.device)
            keys = torch.matmul(keys, self.key_restore, out=restored).add_(self.key_centre)
        return keys, values

    def _normalise_keys(self, keys: torch.Tensor) -> torch.Tensor:
        x = keys.float()
        if self.key_stats is not None:
            centre, scale = self.key_stats
            x = (x - centre) / scale
        if self.rotate_keys:
            x = hadamard_transform(x)
        return x.to(keys.dtype)


class QuantizedKVLayer(_KeyMap, DynamicLayer):
    """One decoder layer's packed keys and values, [2, batch, kv_heads, tokens, ·] (keys first), appended in
    place to buffers grown CAPACITY_BLOCK tokens at a time. `scratch`: where update dequantizes (the
    cache's `DequantizedScratch`; None: new tensors)."""

    def __init__(self, bits: int, rotate_keys: bool, key_stats=None, scratch: DequantizedScratch | None = None):
        super().__init__()
        self._init_keys(bits, rotate_keys, key_stats, scratch)
        self.cumulative_length = 0
        self.stored = None  # {"codes": packed codes, "scale_offset": their scale/offset}: the tokens so far
        self._buffers = None  # what `stored` views, with room for more tokens (None: `stored` is all there is)

    def lazy_initialization(self, key_states, value_states):
        self._place_key_stats(key_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(self._quantize(key_states, value_states))
        self.cumulative_length += key_states.shape[-2]
        return self._dequantize(self.stored, self._step_scratch())

    def _append(self, new: dict) -> None:
        length = 0 if self.stored is None else self.stored["codes"].shape[-2]
        total = length + new["codes"].shape[-2]
        buffers = self._buffers
        if buffers is None or buffers["codes"].shape[-2] < total or any(
                b.shape[:-2] != t.shape[:-2] for b, t in zip(buffers.values(), new.values())):
            buffers = {name: t.new_empty(*t.shape[:-2], _capacity(total), t.shape[-1]) for name, t in new.items()}
            if self.stored is not None:
                for name, t in self.stored.items():
                    buffers[name][..., :length, :] = t
            self._buffers = buffers
        for name, t in new.items():
            buffers[name][..., length:total, :] = t
        self.stored = {name: b[..., :total, :] for name, b in buffers.items()}

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:  # as allocated; the key statistics belong to the model's layer, not to the tokens
        return sum(t.numel() * t.element_size() for t in (self._buffers or self.stored or {}).values())

    def _map(self, fn):
        if self.stored is not None:
            self.stored = {name: fn(t) for name, t in self.stored.items()}
            self._buffers = None  # the next append copies them into new buffers

    def reset(self):
        self.stored, self._buffers, self.cumulative_length, self.is_initialized = None, None, 0, False

    def reorder_cache(self, beam_idx):  # dim 1: the batch (dim 0 is keys/values)
        self._map(lambda t: t.index_select(1, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=1))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[:, indices])

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove < 0 and self.stored is not None:
            self._map(lambda t: t[..., :tokens_to_remove, :])
            self.cumulative_length += tokens_to_remove


class StaticQuantizedKVLayer(_KeyMap, StaticLayer):
    """One decoder layer's packed keys and values in buffers of `max_cache_len` tokens, written in place
    (transformers' StaticLayer with packed storage): every step dequantizes the whole buffer, a fixed
    shape, the positions not yet written masked by attention."""

    def __init__(self, max_cache_len: int, bits: int, rotate_keys: bool, key_stats=None,
                 scratch: DequantizedScratch | None = None):
        super().__init__(max_cache_len)
        self._init_keys(bits, rotate_keys, key_stats, scratch)

    def lazy_initialization(self, key_states, value_states):
        self._place_key_stats(key_states)
        batch, heads, _, head_dim = key_states.shape
        tokens = (2, batch, heads, self.max_cache_len)
        self.stored = {"codes": torch.zeros(*tokens, head_dim * self.bits // 8, dtype=torch.uint8, device=self.device),
                       "scale_offset": torch.zeros(*tokens, 2, dtype=key_states.dtype, device=self.device)}
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: the compiled step reads them in place
            for t in (*self.stored.values(), self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        for name, t in self._quantize(key_states, value_states).items():
            self.stored[name].index_copy_(3, positions, t)
        return self._dequantize(self.stored, self._step_scratch())

    def nbytes(self) -> int:  # the buffers as allocated, for max_cache_len tokens
        return sum(t.numel() * t.element_size() for t in self.stored.values()) if self.is_initialized else 0


class QuantizedKVCache(Cache):
    """The cache of a model whose KV cache is quantized at `bits` (see the module docstring); with
    `max_cache_len`, static (preallocated, compilable) layers."""

    def __init__(self, num_layers: int, bits: int, rotate_keys: bool = True, key_stats: list | None = None,
                 max_cache_len: int | None = None):
        if bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8 for a quantized KV cache, got {bits!r}")
        if key_stats is not None and len(key_stats) != num_layers:
            raise ValueError(f"key_stats must hold one (centre, scale) per layer: {len(key_stats)} for {num_layers}")
        stats = [None if key_stats is None else key_stats[i] for i in range(num_layers)]
        scratch = DequantizedScratch()
        if max_cache_len is None:
            layers = [QuantizedKVLayer(bits, rotate_keys, s, scratch) for s in stats]
        else:
            layers = [StaticQuantizedKVLayer(max_cache_len, bits, rotate_keys, s, scratch) for s in stats]
        super().__init__(layers=layers)
        self.bits, self.key_stats = bits, key_stats

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

    key_stats = key_statistics(model)

    def use_quantized_cache(module, args, kwargs):
        given = [kwargs.pop(k) for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
        cache = given[0] if given else None
        mine = isinstance(cache, QuantizedKVCache) and cache.key_stats is key_stats
        if not mine:
            empty = cache is not None and type(cache) in (DynamicCache, StaticCache) and cache.get_seq_length() == 0
            if cache is not None and not empty:
                raise ValueError(f"this model quantizes its KV cache to {bits} bits in a lowbit QuantizedKVCache "
                                 f"of its own; got a {type(cache).__name__} it did not make. Pass no cache (or an "
                                 f"empty DynamicCache or StaticCache), or the cache an earlier call of this model "
                                 f"returned.")
            length = cache.get_max_length() if isinstance(cache, StaticCache) else None
            cache = QuantizedKVCache(num_layers, bits, rotate_keys, key_stats, max_cache_len=length)
        kwargs[name] = cache
        return args, kwargs

    uninstall(model)
    model._lowbit_kv_hook = decoder.register_forward_pre_hook(use_quantized_cache, with_kwargs=True)


def uninstall(model) -> None:
    hook = getattr(model, "_lowbit_kv_hook", None)
    if hook is not None:
        hook.remove()
        del model._lowbit_kv_hook
