"""Calibration data and layer-by-layer processing, shared by the methods that calibrate (QuaRot's
GPTQ and PCA, ARHQ, Householder).

`layer_by_layer` captures what the first decoder layer receives (hidden states plus the keyword
arguments the model passes it: position embeddings, masks, ...), then hands the caller one layer at a
time and, once the caller is done with it (quantized it, say), runs the calibration samples through
that layer in place. Only one layer's activations for all samples exist at a time, and those live in
an unlinked temporary file (`OffloadedTensors`), read back one batch at a time.
"""
import logging
import os
import random
import tempfile
from dataclasses import dataclass, field

import torch

from .integration import malloc_trim

logger = logging.getLogger(__name__)


def load_calibration_text(source) -> tuple[str, str]:
    """(text, description) from a local text file, a list of strings, or a `datasets` name."""
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(s, str) for s in source):
            raise ValueError("calibration: a list of calibration texts must hold at least one string")
        return "\n\n".join(source), f"{len(source)} strings"
    if not isinstance(source, str) or not source:
        raise ValueError(f"calibration must be a text file path, a list of strings or a datasets name, got {source!r}")
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return f.read(), source
    try:
        from datasets import load_dataset

        name, _, subset = source.partition(":")
        rows = load_dataset(name, subset or None, split="train")["text"]
    except Exception as err:
        raise ValueError(f"calibration {source!r} is neither a local file nor a loadable `datasets` name "
                         f"(name[:subset]): {err}") from err
    return "\n\n".join(rows), f"datasets {source} (train)"


def calibration_ids(tokenizer, source, nsamples: int, seqlen: int, seed: int = 13) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from the tokenized calibration text: [nsamples, seqlen]."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples must be >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    text, desc = load_calibration_text(source)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text {desc} has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(nsamples)]
    logger.info("calibration: %d x %d tokens from %s", nsamples, seqlen, desc)
    return torch.stack([ids[s:s + seqlen] for s in starts])


def model_calibration_ids(model, config) -> torch.Tensor:
    """`calibration_ids` for a config's calibration fields, tokenized by the model's own tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    except Exception as err:
        raise ValueError(f"calibration needs the tokenizer of {model.name_or_path!r}: {err}") from err
    return calibration_ids(tokenizer, config.calibration, config.nsamples, config.seqlen, config.seed)


class _Captured(Exception):
    pass


class OffloadedTensors:
    """A list of tensors kept in an unlinked temporary file (in `tempfile.gettempdir()`), each read back
    when indexed. Calibration activations live there rather than in the process: with the default
    128 samples of 2048 tokens they can outweigh a small model's weights, and in the page cache the
    kernel can write them out instead of adding them to the peak."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="lowbit-activations-")
        self._slots = []  # (byte offset, shape, dtype, device) per tensor
        self._end = 0

    def append(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self._slots.append((self._end, tensor.shape, tensor.dtype, tensor.device))
        self._end += nbytes
        self[len(self._slots) - 1] = tensor

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> torch.Tensor:
        offset, shape, dtype, device = self._slots[i]
        out = torch.empty(shape, dtype=dtype)
        self._transfer(lambda fd, b, at: os.preadv(fd, [b], at), out, offset, "short read from")
        return out.to(device)

    def __setitem__(self, i: int, tensor: torch.Tensor) -> None:
        offset, shape, dtype, _ = self._slots[i]
        if tensor.shape != shape or tensor.dtype != dtype:
            raise ValueError(f"slot {i} holds {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        self._transfer(os.pwrite, tensor.detach().cpu().contiguous(), offset, "short write to")

    def _transfer(self, io, tensor: torch.Tensor, offset: int, failure: str) -> None:
        """All of `tensor`'s bytes through `io(fd, buffer, file offset) -> bytes moved` (pread/pwrite may
        move fewer than asked; none at all means a truncated file or a full disk)."""
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            n = io(self._file.fileno(), view[done:], offset + done)
            if n <= 0:
                raise OSError(f"calibration activations: {failure} {self._file.name}")
            done += n


@dataclass
class LayerInputs:
    """One decoder layer's inputs for every calibration sample, batch by batch."""

    hidden: list | OffloadedTensors = field(default_factory=OffloadedTensors)  # [batch, seqlen, hidden] each
    kwargs: list = field(default_factory=list)  # the keyword arguments of each batch's call

    def batches(self):
        return zip(self.hidden, self.kwargs)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


@torch.no_grad()
def capture_first_layer_inputs(model, input_ids: torch.Tensor, batch_size: int) -> LayerInputs:
    layers = model.model.layers
    captured = LayerInputs()

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        # batches of one length get the same position embeddings: one copy serves them all
        previous = captured.kwargs[-1] if captured.kwargs else {}
        captured.kwargs.append({k: previous[k] if k in previous and _same(v, previous[k]) else v
                                for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


# Called after every calibration batch: glibc serves blocks below its (self-raising) mmap threshold from
# the heap, where a batch's activations leave holes that the next batch's do not exactly fit; without
# handing the freed pages back, resident memory grows with the number of calibration batches.
_release_freed_memory = malloc_trim()


@torch.no_grad()
def run_layer(layer, inputs: LayerInputs) -> None:
    """Replace `inputs` by what `layer` outputs for them (the next layer's inputs)."""
    for i, (hidden, kwargs) in enumerate(inputs.batches()):
        out = layer(hidden, **kwargs)
        inputs.hidden[i] = out[0] if isinstance(out, tuple) else out
        del out
        _release_freed_memory()


def layer_by_layer(model, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = True):
    """Yield (index, layer, inputs) for each decoder layer; after the caller's turn, the samples are
    propagated through the (possibly modified) layer to become the next layer's inputs."""
    from tqdm.auto import tqdm

    inputs = capture_first_layer_inputs(model, input_ids, batch_size)
    for index, layer in enumerate(tqdm(model.model.layers, desc="layers", disable=not progress)):
        yield index, layer, inputs
        run_layer(layer, inputs)


GRAM_ROWS = 256  # tokens converted to float32 at once


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx in float32 for x [tokens, features], accumulated over blocks of tokens (no float copy of x)."""
    total = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    for block in x.split(GRAM_ROWS):
        block = block.float()
        total.addmm_(block.T, block)
    return total


@torch.no_grad()
def input_statistics(layer, inputs: LayerInputs, modules: dict, stat, reduce):
    """Run the samples through `layer` and reduce `stat(x)` over every input x [tokens, features] of each
    named submodule: ({name: statistic}, {name: tokens seen}). Submodules reading the same tensor (q/k/v,
    gate/up) share one computation and one result object. `reduce(total, value)` may work in place
    (`torch.Tensor.add_`): the first value becomes the total."""
    results, counts, owner, hooks = {}, {}, {}, []

    def observe(module, args, name):
        x = args[0]
        first = owner.setdefault(id(x), (x, name))[1]  # x held: its id must not be reused within the batch
        if first == name:
            value = stat(x.reshape(-1, x.shape[-1]))
            results[name] = value if name not in results else reduce(results[name], value)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1]
        else:
            results[name], counts[name] = results[first], counts[first]

    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: observe(m, args, name)))
    try:
        for hidden, kwargs in inputs.batches():
            layer(hidden, **kwargs)
            owner.clear()
            _release_freed_memory()
    finally:
        for h in hooks:
            h.remove()
    return results, counts
