"""push_to_hub / from_pretrained(repo_id) against ../shared/bin/fake_hub.py, a local Hub stand-in."""
import sys

import pytest

from conftest import SHARED, run_python

PUSH = """
import hashlib, json, os, torch, lowbit
from huggingface_hub import HfApi, hf_hub_download
from transformers import AutoModelForCausalLM, AutoTokenizer
src, local = {src!r}, {local!r}
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                             quantization_config=lowbit.HqqConfig(bits=4, group_size=64))
tok = AutoTokenizer.from_pretrained(src)
model.save_pretrained(local)
model.push_to_hub("user/tiny-hqq")
tok.push_to_hub("user/tiny-hqq")
ids = tok("Once upon a time", return_tensors="pt").input_ids
with torch.no_grad():
    torch.save({{"ids": ids, "logits": model(ids).logits}}, os.path.join(local, "expected.pt"))
files = HfApi().list_repo_files("user/tiny-hqq")
digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
same = {{f: digest(hf_hub_download("user/tiny-hqq", f)) == digest(os.path.join(local, f))
        for f in os.listdir(local) if f != "expected.pt"}}
print(json.dumps({{"files": files, "same": same}}))
"""

PULL = """
import json, torch
from transformers import AutoModelForCausalLM, pipeline
model = AutoModelForCausalLM.from_pretrained("user/tiny-hqq")
exp = torch.load({local!r} + "/expected.pt")
with torch.no_grad():
    equal = torch.equal(model(exp["ids"]).logits, exp["logits"])
text = pipeline("text-generation", model="user/tiny-hqq")("Once upon a time", max_new_tokens=5)[0]["generated_text"]
print(json.dumps({{"equal": equal, "text": text, "types": sorted({{type(m).__name__ for m in model.modules()}})}}))
"""


@pytest.fixture
def fake_hub(tmp_path):
    if not (SHARED / "bin" / "fake_hub.py").exists():
        pytest.skip("../shared/bin/fake_hub.py is absent")
    sys.path.insert(0, str(SHARED / "bin"))
    try:
        from fake_hub import serve
    finally:
        sys.path.pop(0)
    url, stop = serve(str(tmp_path / "hub"))
    yield {"HF_ENDPOINT": url, "HF_TOKEN": "test-token", "HF_HUB_DISABLE_TELEMETRY": "1"}
    stop()


@pytest.mark.slow
def test_push_to_hub_uploads_what_save_pretrained_writes_and_reloads(fake_hub, tiny_llama, tmp_path):
    local = str(tmp_path / "local")
    env = {**fake_hub, "HF_HOME": str(tmp_path / "hf-home-push")}
    pushed = run_python(PUSH.format(src=str(tiny_llama), local=local), env=env)
    assert pushed["same"] and all(pushed["same"].values()), pushed
    assert "model.safetensors" in pushed["files"]
    env = {**fake_hub, "HF_HOME": str(tmp_path / "hf-home-pull")}
    pulled = run_python(PULL.format(local=local), env=env)
    assert pulled["equal"] and "QuantLinear" in pulled["types"]
    assert pulled["text"].startswith("Once upon a time")
