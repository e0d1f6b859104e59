"""What MAC's guard measures on SmolLM2 (CPU fp32): per layer, the hit rate of the first 16
decode steps and the output's relative L1 distance from exact attention at the 16th, for a
setting that keeps every answer (MACConfig()) and one that cannot (forced hits), on the chat
passkey prompt of passkey_cpu.py (docs/SAFE_DEFAULTS.md 11).

    python examples/safe_defaults/guard_errors.py 4096 [DEPTH [default,forced hits]]
"""
import glob
import json
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import macopt
from macopt import mac_guard

torch.set_num_threads(2)
PATH = "/root/.cache/macopt/smollm2-135m-instruct"
n_tokens, depth = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
tok = AutoTokenizer.from_pretrained(PATH)
text = "".join(open(f).read() for f in sorted(glob.glob("/usr/share/common-licenses/*"))
               if not f.endswith(("GPL", "LGPL", "GFDL")))
ids = tok(text)["input_ids"][: n_tokens - 80]
cut, key = int(len(ids) * depth), "48213"
needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
body = tok.decode(ids[:cut]) + needle + tok.decode(ids[cut:])
messages = [{"role": "user", "content": body + "\n\nWhat is the pass key? Answer with the "
             "number only."}]
enc = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
          return_tensors="pt")
CONFIGS = {"default": macopt.MACConfig(), "forced hits": macopt.MACConfig(tau=-1000.0)}
CONFIGS = {name: CONFIGS[name] for name in (sys.argv[3].split(",") if len(sys.argv) > 3 else CONFIGS)}
mac_guard.HIT_LIMIT = -1.0  # measure every site, not only those over the limit
results = {}
for name, config in CONFIGS.items():
    mac_guard.reset()
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    model = macopt.optimize(model, config) or model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(**enc, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             cache_implementation="static")
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    first = min(mac_guard.CHECKS, default=0)  # site ids go on counting across optimize() calls
    checks = {site - first: mac_guard.CHECKS[site] for site in sorted(mac_guard.CHECKS)}
    results[name] = dict(answer=answer.strip()[:30], correct=key in answer,
                         sites={str(s): list(c) for s, c in checks.items()})
    print(f"{name}: answer {answer.strip()[:30]!r} ({'right' if key in answer else 'wrong'})")
    for layer, (rate, error) in checks.items():
        print(f"  layer {layer:2d}: hit rate {rate:.2f}  error {error:.4f}")
print(json.dumps(dict(prompt_tokens=enc["input_ids"].shape[1], depth=depth, results=results)))
