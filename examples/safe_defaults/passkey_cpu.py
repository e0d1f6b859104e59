"""Passkey at 20/50/80% depth of ~N tokens of licence text, through the chat template, greedy
generate with a static cache. Usage: passkey.py N method [method...]; method: unmodified |
exact | topk | topk_page | topk_channel | mac | mac_exact"""
import glob
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import macopt

torch.set_num_threads(2)
import os

if os.environ.get("STATIC_SHAPES"):
    # Prompts one token apart get static caches one key apart; dynamo's automatic dynamic
    # shapes then make the cache length symbolic. A fractional budget used to refuse that
    # ("TopKPhiConfig.budget as a fraction needs a static cache length"); the decode op now
    # resolves it from the cache's shape, so this only chooses recompiling per length.
    torch._dynamo.config.automatic_dynamic_shapes = False

PATH = "/root/.cache/macopt/smollm2-135m-instruct"
n_tokens = int(sys.argv[1]); methods = sys.argv[2:]
tok = AutoTokenizer.from_pretrained(PATH)
text = "".join(open(f).read() for f in sorted(glob.glob("/usr/share/common-licenses/*")) if not f.endswith(("GPL", "LGPL", "GFDL")))
ids = tok(text)["input_ids"][: n_tokens - 80]
KEYS = ["48213", "70596", "31847"]
def prompt(depth, key):
    cut = int(len(ids) * depth)
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    body = tok.decode(ids[:cut]) + needle + tok.decode(ids[cut:])
    msgs = [{"role": "user", "content": body + "\n\nWhat is the pass key? Answer with the number only."}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
CONFIGS = {"unmodified": None, "exact": macopt.ExactConfig(), "topk": macopt.TopKPhiConfig(),
           "topk_page": macopt.TopKPhiConfig(selector="page"),
           "topk_channel": macopt.TopKPhiConfig(selector="channel"), "mac": macopt.MACConfig(),
           "mac_exact": macopt.MACConfig(tau=1.0)}
DEPTHS = [float(x) for x in os.environ.get("DEPTHS", "0.2,0.5,0.8").split(",")]
for name in methods:
    device = os.environ.get("DEVICE", "cpu")  # DEVICE=cuda runs in bf16
    dtype = torch.bfloat16 if device == "cuda" or os.environ.get("BF16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=dtype).to(device).eval()
    if CONFIGS[name] is not None:
        model = macopt.optimize(model, CONFIGS[name]) or model
    score = 0; t0 = time.time(); outs = []
    for depth, key in zip(DEPTHS, KEYS):
        enc = tok(prompt(depth, key), return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, cache_implementation="static")
        ans = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        score += key in ans; outs.append(ans.strip()[:20])
    extra = ""
    if CONFIGS[name] is not None:
        try:
            extra = str(macopt.stats(model))[:600]
        except Exception as e:
            extra = f"stats: {e!r}"
    print(f"{name}: {score}/{len(DEPTHS)} prompt tokens {enc['input_ids'].shape[1]} answers {outs} ({time.time()-t0:.0f}s)\n  {extra}", flush=True)
