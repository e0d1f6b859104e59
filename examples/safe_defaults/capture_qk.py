"""Capture per-layer post-RoPE keys, the last queries and pre-RoPE queries of SmolLM2 on real text."""
import glob
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

torch.set_num_threads(2)
PATH = "/root/.cache/macopt/smollm2-135m-instruct"
n_tokens = int(sys.argv[1]); out = sys.argv[2]
tok = AutoTokenizer.from_pretrained(PATH)
text = "".join(open(f).read() for f in sorted(glob.glob("/usr/share/common-licenses/*")) if not f.endswith(("GPL", "LGPL", "GFDL")))
# passkey at 50% depth, stated twice, then a question through the chat template
ids = tok(text)["input_ids"]
body_len = n_tokens - 80
half = tok.decode(ids[: body_len // 2]); rest = tok.decode(ids[body_len // 2: body_len])
needle = " The pass key is 48213. Remember it. 48213 is the pass key. "
msgs = [{"role": "user", "content": half + needle + rest + "\n\nWhat is the pass key? Answer with the number only."}]
prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
enc = tok(prompt, return_tensors="pt")
input_ids = enc["input_ids"]
N = input_ids.shape[1]
needle_ids = tok(needle)["input_ids"]
# locate the digit tokens of the needle
digits = [i for i in range(N) if tok.decode(input_ids[0, i]).strip().isdigit()]
print("N", N, "digit positions", digits[:20])
model = AutoModelForCausalLM.from_pretrained(PATH, torch_dtype=torch.float32)
store = {"k": [], "q_last": [], "q_pre": [], "q_pre_norm": []}
LAST = 8; PRE = 1024
def capture(module, query, key, value, attention_mask, **kw):
    store["k"].append(key[0].detach().clone())            # [Hkv, N, D]
    store["q_last"].append(query[0, :, -LAST:].detach().clone())  # [Hq, LAST, D]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
ALL_ATTENTION_FUNCTIONS["capture"] = capture
model.config._attn_implementation = "capture"
for layer in model.model.layers:
    def hook(mod, inp, outp):
        q = outp[0].view(outp.shape[1], -1, 64).transpose(0, 1)  # [Hq, N, D]
        store["q_pre"].append(q[:, -PRE:].detach().clone())
        store["q_pre_norm"].append(q.norm(dim=-1).detach().clone())
    layer.self_attn.q_proj.register_forward_hook(hook)
with torch.no_grad():
    out_logits = model(input_ids).logits
torch.save({"input_ids": input_ids, "digits": digits, **{k: torch.stack(v) for k, v in store.items()}}, out)
print("saved", out)
