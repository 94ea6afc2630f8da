import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit import calibration


def test_layer_by_layer_reproduces_the_forward_pass(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    for index, layer, inputs in calibration.layer_by_layer(model, ids, batch_size=2, progress=False):
        seen.append(index)
        assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    hidden = torch.cat(list(inputs.hidden))
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(hidden))
        ref = model(ids).logits
    assert seen == list(range(model.config.num_hidden_layers))
    assert torch.allclose(logits, ref, atol=1e-5)


def test_calibration_ids_are_seeded_windows(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    text.write_text(" ".join(f"word{i}" for i in range(400)))  # no repeats: a window's tokens say where it starts
    a = calibration.calibration_ids(tok, str(text), nsamples=4, seqlen=32, seed=13)
    b = calibration.calibration_ids(tok, str(text), nsamples=4, seqlen=32, seed=13)
    c = calibration.calibration_ids(tok, str(text), nsamples=4, seqlen=32, seed=14)
    assert a.shape == c.shape == (4, 32) and torch.equal(a, b)
    ids = tok(text.read_text(), return_tensors="pt").input_ids[0]
    starts = {seed: [next(s for s in range(ids.numel() - 31) if torch.equal(ids[s:s + 32], w)) for w in windows]
              for seed, windows in ((13, a), (14, c))}
    assert starts[13] != starts[14]  # the seed picks the windows, and nothing else changes


def test_calibration_errors(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="fewer than seqlen=512"):
        calibration.calibration_ids(tok, ["short text"], nsamples=2, seqlen=512)
    with pytest.raises(ValueError, match="neither a local file nor a loadable `datasets` name"):
        calibration.calibration_ids(tok, "/no/such/file.txt", nsamples=2, seqlen=8)
    with pytest.raises(ValueError, match="nsamples must be >= 1"):
        calibration.calibration_ids(tok, ["x"], nsamples=0, seqlen=8)


def test_gram_accumulated_by_blocks_equals_the_product():
    x = torch.randn(2 * calibration.GRAM_ROWS + 7, 48, dtype=torch.float64).to(torch.bfloat16)
    ref = x.double().T @ x.double()
    assert torch.allclose(calibration.gram(x).double(), ref, rtol=1e-5, atol=1e-3)


def test_offloaded_tensors_round_trip_and_refuse_a_different_shape():
    store = calibration.OffloadedTensors()
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 7, 5, generator=g).to(torch.bfloat16), torch.randn(1, 3, generator=g)]
    for t in tensors:
        store.append(t)
    assert len(store) == 2 and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(store, tensors))
    replacement = torch.randn(2, 7, 5, generator=g).to(torch.bfloat16)
    store[0] = replacement
    assert torch.equal(store[0], replacement) and torch.equal(store[1], tensors[1])
    with pytest.raises(ValueError, match="slot 1 holds"):
        store[1] = torch.zeros(1, 4)


def test_offloaded_tensors_fail_loudly_on_zero_byte_io(monkeypatch):
    """pwrite taking nothing, or preadv at the end of a truncated file, returns 0: the store must raise,
    not loop forever or hand back an unfilled tensor."""
    store = calibration.OffloadedTensors()
    store.append(torch.ones(4, 3))
    monkeypatch.setattr(calibration.os, "pwrite", lambda *a: 0)
    with pytest.raises(OSError, match="short write"):
        store[0] = torch.zeros(4, 3)
    monkeypatch.setattr(calibration.os, "preadv", lambda *a: 0)
    with pytest.raises(OSError, match="short read"):
        store[0]


def test_batches_of_one_shape_share_their_position_embeddings(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    kwargs = calibration.capture_first_layer_inputs(model, ids, batch_size=2).kwargs
    assert kwargs[0]["position_embeddings"] is kwargs[1]["position_embeddings"] is kwargs[2]["position_embeddings"]
    assert not calibration._same(kwargs[0]["position_embeddings"], tuple(t[..., :-1] for t in kwargs[0]["position_embeddings"]))
