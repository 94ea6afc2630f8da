import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = ROOT / "examples" / "models" / "stories260k"  # shipped with the repository: always there


def char_tokenizer():
    """A character-level fast tokenizer, built offline, good enough for generate and pipeline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\n"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny(arch: str, path: Path, **overrides) -> Path:
    """A random tiny causal LM saved in fp32 with a tokenizer; intermediate 176 = 11·16 is an odd width on purpose."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=80, hidden_size=128, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    common.update(overrides)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch](**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def stories():
    return STORIES


# calibration texts for the tiny models (a list of strings, so no file is needed)
CALIBRATION_TEXTS = ["the quick brown fox jumps over the lazy dog. " * 12, "pack my box with five dozen liquor jugs. " * 12]


def random_ids(vocab, shape=(2, 24), seed=1):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_without_cache(model, ids, new_tokens: int):
    """The greedy continuation recomputed from scratch at every step (full forward, no KV cache): the
    reference that `generate` (cached, incremental) must reproduce."""
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def check_generation(model, tok, reloaded=None, prompt="hello", new_tokens=6):
    """Greedy `generate` equals the no-cache reference, and `pipeline` on `reloaded` (the same model after
    save/reload, default: `model`) writes exactly those tokens."""
    from transformers import pipeline

    ids = tok(prompt, return_tensors="pt").input_ids
    tokens = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(tokens, greedy_without_cache(model, ids, new_tokens))
    pipe = pipeline("text-generation", model=reloaded if reloaded is not None else model, tokenizer=tok)
    out = pipe(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_tensors=True)
    assert list(out[0]["generated_token_ids"]) == tokens[0].tolist()
    return tokens


def forward_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def cli_refuses(src, tmp_path, capsys, args) -> str:
    """`lowbit quantize ARGS` on `src` must fail with exit code 2 and write nothing; its stderr."""
    from lowbit.cli import main

    assert main(["quantize", "-q", "--src", str(src), "--dst", str(tmp_path / "out"), *args]) == 2
    assert list(tmp_path.iterdir()) == []
    return capsys.readouterr().err


def run_python(code: str, env=None, timeout=300) -> dict:
    """Run `code` in a fresh interpreter (the installed lowbit, its .pth hook active); it prints one JSON line last."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
