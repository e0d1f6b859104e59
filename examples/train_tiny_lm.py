"""Train a tiny Llama-style causal LM on the Python sources installed on this machine.

A self-contained script (it does not import macopt) that builds a small model with real
attention patterns, for fidelity tests of approximate attention:

  1. data: the .py files of the standard library and the installed packages (sysconfig's
     stdlib / purelib / platlib). Files are ordered by a hash of their root-relative path, so
     the order and the split do not depend on the file system; a file is held out for
     evaluation when that hash falls below --heldout-frac. Lists of both sets are written.
  2. tokenizer: byte-level BPE trained with `tokenizers` on the training files only, saved as
     tokenizer.json (loadable by transformers' PreTrainedTokenizerFast / AutoTokenizer).
  3. model: transformers LlamaForCausalLM (RoPE, GQA, head dim 128 by default), trained on
     packed sequences (documents joined by <|endoftext|>) with AdamW and a cosine schedule, bf16
     autocast on CUDA, optional torch.compile. Stops at --max-steps or --max-minutes,
     whichever comes first; the schedule follows whichever is further along.
  4. output (--out): model.safetensors (bf16), config.json, tokenizer files, train_log.jsonl,
     train_files.txt, heldout_files.txt, heldout.txt.gz (the held-out text itself) and a
     MODEL_CARD.md stating how the model was made.

    python examples/train_tiny_lm.py --out runs/tiny-lm --max-minutes 8
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--out", required=True, help="output directory")
    # data
    a("--max-bytes", type=int, default=200_000_000, help="cap on training text (bytes)")
    a("--heldout-frac", type=float, default=0.05, help="fraction of files held out (by hash)")
    a("--heldout-bytes", type=int, default=2_000_000, help="cap on held-out text (bytes)")
    a("--max-file-bytes", type=int, default=1_000_000, help="skip larger (generated) files")
    a("--source-dir", action="append", default=None,
      help="read .py files from here instead of sysconfig's stdlib/purelib/platlib (repeatable)")
    # tokenizer
    a("--vocab-size", type=int, default=8192)
    a("--tokenizer-bytes", type=int, default=50_000_000, help="train the BPE on this much text")
    # model
    a("--hidden-size", type=int, default=512)
    a("--intermediate-size", type=int, default=1536)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=8)
    a("--kv-heads", type=int, default=2)
    a("--head-dim", type=int, default=128)
    a("--rope-theta", type=float, default=500_000.0)
    a("--max-position-embeddings", type=int, default=8192)
    a("--max-mb", type=float, default=40.0, help="refuse to start if bf16 weights exceed this (MB)")
    # training
    a("--seq-len", type=int, default=8192)
    a("--batch-size", type=int, default=8, help="sequences per step at --seq-len")
    a("--short-seq-len", type=int, default=1024,
      help="context of the warmup phase (same tokens per step); 0 disables it")
    a("--short-frac", type=float, default=0.2, help="fraction of the run at --short-seq-len")
    a("--max-steps", type=int, default=100_000)
    a("--max-minutes", type=float, default=8.0, help="training time box (excludes data prep)")
    a("--lr", type=float, default=2e-3)
    a("--min-lr-frac", type=float, default=0.1)
    a("--warmup-steps", type=int, default=100)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--eval-every", type=int, default=200)
    a("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    a("--log-every", type=int, default=20)
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.max_position_embeddings < args.seq_len:
        p.error("--max-position-embeddings must be >= --seq-len")
    if args.short_seq_len and args.seq_len % args.short_seq_len:
        p.error("--seq-len must be a multiple of --short-seq-len")
    return args


# ----------------------------------------------------------------------------------------------
# 1. Data: installed Python sources, split by file


def source_roots(args) -> list[tuple[str, Path]]:
    if args.source_dir:
        return [(f"src{i}", Path(d).resolve()) for i, d in enumerate(args.source_dir)]
    paths = sysconfig.get_paths()
    roots, seen = [], set()
    for label in ("stdlib", "purelib", "platlib"):
        r = Path(paths[label]).resolve()
        if r.is_dir() and r not in seen:
            seen.add(r)
            roots.append((label, r))
    return roots


def path_hash(name: str) -> float:
    """Uniform in [0, 1), from the root-relative name: stable across machines and runs."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:15], 16) / 16**15


def list_sources(args) -> list[tuple[float, str, Path]]:
    roots = source_roots(args)
    root_dirs = {r for _, r in roots}
    files = []
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            # site-packages lives inside the stdlib dir: leave it to its own root
            dirnames[:] = sorted(
                n for n in dirnames if n != "__pycache__" and (d / n).resolve() not in root_dirs
            )
            for fn in sorted(filenames):
                if fn.endswith(".py"):
                    f = d / fn
                    name = f"{label}/{f.relative_to(root).as_posix()}"
                    files.append((path_hash(name), name, f))
    files.sort()  # hash order: deterministic, and mixes packages so a byte cap samples them all
    return files


def read_text(path: Path, max_bytes: int) -> str | None:
    try:
        if path.is_symlink() or path.stat().st_size > max_bytes:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def collect_data(args):
    train, heldout = [], []  # (name, text)
    train_bytes = heldout_bytes = 0
    n_seen = 0
    for h, name, path in list_sources(args):
        n_seen += 1
        is_heldout = h < args.heldout_frac
        if is_heldout and heldout_bytes >= args.heldout_bytes:
            continue
        if not is_heldout and train_bytes >= args.max_bytes:
            if heldout_bytes >= args.heldout_bytes:
                break
            continue
        text = read_text(path, args.max_file_bytes)
        if text is None:
            continue
        nbytes = len(text.encode())
        if is_heldout:
            heldout.append((name, text))
            heldout_bytes += nbytes
        else:
            train.append((name, text))
            train_bytes += nbytes
    stats = dict(files_scanned=n_seen, train_files=len(train), train_bytes=train_bytes,
                 heldout_files=len(heldout), heldout_bytes=heldout_bytes)
    return train, heldout, stats


# ----------------------------------------------------------------------------------------------
# 2. Tokenizer: byte-level BPE on the training files


def train_tokenizer(texts: list[str], args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    subset, n = [], 0
    for t in texts:
        if n >= args.tokenizer_bytes:
            break
        subset.append(t)
        n += len(t.encode())
    tok.train_from_iterator(subset, trainer, length=len(subset))
    return tok, n


def encode(tok, texts: list[str]) -> torch.Tensor:
    """Pack documents into one stream, each followed by EOS."""
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# 3. Model and training


def build_config(args, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        attention_bias=False, mlp_bias=False, use_cache=False,
    )


def count_params(config) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(config)
    return sum(p.numel() for p in m.parameters())  # tied embeddings counted once


def get_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator, device):
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    xy = stream[idx].long().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cos)


def loss_fn(model, x, y, autocast):
    with autocast():
        logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, args, autocast) -> float:
    """Mean loss over fixed, evenly spaced full-context windows of the held-out stream."""
    model.eval()
    n_win = max(1, min(args.eval_batches * args.batch_size, (len(stream) - 1) // args.seq_len))
    starts = torch.linspace(0, len(stream) - args.seq_len - 1, n_win).long()
    losses = []
    for chunk in starts.split(args.batch_size):
        idx = chunk[:, None] + torch.arange(args.seq_len + 1)
        xy = stream[idx].long().to(args.device)
        losses.append(loss_fn(model, xy[:, :-1], xy[:, 1:], autocast).item() * len(chunk))
    model.train()
    return sum(losses) / n_win


def train(model, train_ids, heldout_ids, args, log):
    device = torch.device(args.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = nullcontext
    # static shapes: one graph per context length (warmup phase, then full)
    fwd = torch.compile(model, dynamic=False) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed)

    tokens_per_step = args.batch_size * args.seq_len
    budget_s = args.max_minutes * 60
    t0 = time.perf_counter()
    t_log, tok_log = t0, 0
    tokens_seen, step, stop_reason = 0, 0, "max_steps"
    train_loss = float("nan")
    losses = []
    while step < args.max_steps:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            stop_reason = "max_minutes"
            break
        progress = max(step / args.max_steps, elapsed / budget_s)
        short = args.short_seq_len and progress < args.short_frac
        seq = args.short_seq_len if short else args.seq_len
        lr = lr_at(step, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr

        x, y = get_batch(train_ids, tokens_per_step // seq, seq, gen, device)
        loss = loss_fn(fwd, x, y, autocast)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        losses.append(loss.item())

        if step % args.log_every == 0 or step == 1 or step == args.max_steps:
            now = time.perf_counter()
            train_loss = sum(losses) / len(losses)
            losses = []
            log(dict(type="train", step=step, loss=round(train_loss, 4), lr=lr, seq_len=seq,
                     grad_norm=round(float(gnorm), 3), tokens=tokens_seen,
                     tok_per_s=round((tokens_seen - tok_log) / (now - t_log)),
                     elapsed_s=round(now - t0, 1)))
            t_log, tok_log = now, tokens_seen
        if step % args.eval_every == 0:
            log(dict(type="eval", step=step, heldout_loss=round(
                evaluate(model, heldout_ids, args, autocast), 4), tokens=tokens_seen,
                elapsed_s=round(time.perf_counter() - t0, 1)))
    if losses:
        train_loss = sum(losses) / len(losses)
    train_s = time.perf_counter() - t0
    final_heldout = evaluate(model, heldout_ids, args, autocast)
    log(dict(type="final", step=step, train_loss=round(train_loss, 4),
             heldout_loss=round(final_heldout, 4), tokens=tokens_seen, train_s=round(train_s, 1),
             stop_reason=stop_reason))
    return dict(steps=step, tokens_seen=tokens_seen, train_s=train_s, stop_reason=stop_reason,
                train_loss=train_loss, heldout_loss=final_heldout)


# ----------------------------------------------------------------------------------------------
# 4. Output


def versions() -> dict:
    import safetensors
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__}


def hardware(device: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()})"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); {cpu}"
    return f"CPU only; {cpu}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_card(out: Path, args, argv, info: dict) -> None:
    d, r, c = info["data"], info["result"], info["config"]
    ppl = math.exp(min(r["heldout_loss"], 50))
    roots = "\n".join(f"  - `{label}`: `{path}`" for label, path in info["roots"])
    card = f"""# Tiny Llama on installed Python sources

Made by `examples/train_tiny_lm.py` (repository commit `{info['commit']}`), {info['date']}.

Command line:

```
python examples/train_tiny_lm.py {shlex.join(argv)}
```

## Data

- Source: the `.py` files of the Python standard library and the installed packages on the
  training machine (roots from `sysconfig.get_paths()` unless `--source-dir` was given):
{roots}
- Files ordered by SHA-256 of `root-label/relative/path`; a file is held out when that hash
  (as a fraction of 2^60) is below {args.heldout_frac}. Files over {args.max_file_bytes} bytes,
  symlinks, and non-UTF-8 files are skipped. Caps: {args.max_bytes} training bytes,
  {args.heldout_bytes} held-out bytes, taken in hash order.
- Training: {d['train_files']} files, {d['train_bytes']:,} bytes, {d['train_tokens']:,} tokens
  (`train_files.txt`).
- Held out: {d['heldout_files']} files, {d['heldout_bytes']:,} bytes, {d['heldout_tokens']:,}
  tokens (`heldout_files.txt`; the text itself, documents joined by `{EOS}`, in
  `heldout.txt.gz`). No held-out file was used for the tokenizer or the model.

## Tokenizer

Byte-level BPE (`tokenizers` {info['versions']['tokenizers']}), vocabulary {d['vocab_size']},
one special token `{EOS}` (id {d['eos_id']}) used as BOS/EOS/PAD and as the document separator,
trained on the first {d['tokenizer_bytes']:,} bytes of the training files (hash order).
{d['train_bytes'] / max(d['train_tokens'], 1):.2f} bytes per token on the training text.

## Model

`LlamaForCausalLM`: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP
{c['intermediate_size']}, {c['num_attention_heads']} query heads / {c['num_key_value_heads']}
KV heads (GQA), head dim {c['head_dim']}, RoPE theta {args.rope_theta:g},
max_position_embeddings {c['max_position_embeddings']}, tied embeddings.
{info['n_params']:,} parameters; `model.safetensors` is bf16, {info['file_bytes']:,} bytes
(sha256 `{info['sha256']}`).

## Training

- Packed sequences: random windows of the training token stream (seeded, seed {args.seed}).
- Context {args.seq_len}, {args.batch_size * args.seq_len:,} tokens per step; warmup phase:
  {"none" if not args.short_seq_len else
   f"first {args.short_frac:.0%} of the run at context {args.short_seq_len}"}.
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak LR {args.lr},
  {args.warmup_steps} linear warmup steps, cosine to {args.min_lr_frac} x peak over
  max(step / {args.max_steps}, elapsed / {args.max_minutes} min); grad clip {args.grad_clip}.
- {"bf16 autocast" if args.device.startswith("cuda") else "fp32"} on {args.device}, fp32
  master weights; torch.compile: {args.compile}.
- Steps: **{r['steps']}** (stopped by {r['stop_reason']}), tokens seen: **{r['tokens_seen']:,}**,
  training time {r['train_s']:.0f} s.
- Final train loss (mean of last log interval): **{r['train_loss']:.4f}**; held-out loss at
  context {args.seq_len}: **{r['heldout_loss']:.4f}** (perplexity {ppl:.2f}).
- Log: `train_log.jsonl` (JSON lines: `train`, `eval` and `final` records).

## Environment

- Hardware: {info['hardware']}
- Versions: {", ".join(f"{k} {v}" for k, v in info['versions'].items())}
- GPU runs are not bit-reproducible (atomics in attention backward); data, split, tokenizer and
  batch order are deterministic given the installed files and the seed.
"""
    (out / "MODEL_CARD.md").write_text(card)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    log_f = open(out / "train_log.jsonl", "w")

    def log(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    # Size check first: refuse before any expensive work.
    config = build_config(args, args.vocab_size, 0)
    n_params = count_params(config)
    est_mb = 2 * n_params / 1e6
    print(f"model: {n_params:,} parameters, bf16 weights ~{est_mb:.1f} MB (limit {args.max_mb})")
    if est_mb > args.max_mb:
        raise SystemExit(f"model too large: {est_mb:.1f} MB > --max-mb {args.max_mb}")

    t = time.perf_counter()
    train_docs, heldout_docs, dstats = collect_data(args)
    if not train_docs or not heldout_docs:
        raise SystemExit(f"not enough source files: {dstats}")
    (out / "train_files.txt").write_text("".join(n + "\n" for n, _ in train_docs))
    (out / "heldout_files.txt").write_text("".join(n + "\n" for n, _ in heldout_docs))
    print(f"data: {dstats} ({time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    tok, tok_bytes = train_tokenizer([x for _, x in train_docs], args)
    eos_id = tok.token_to_id(EOS)
    train_ids = encode(tok, [x for _, x in train_docs])
    heldout_ids = encode(tok, [x for _, x in heldout_docs])
    with gzip.GzipFile(out / "heldout.txt.gz", "wb", mtime=0) as f:
        f.write(EOS.join(x for _, x in heldout_docs).encode())
    print(f"tokens: train {len(train_ids):,}, held-out {len(heldout_ids):,}, "
          f"vocab {tok.get_vocab_size()} ({time.perf_counter() - t:.1f} s)")
    if len(heldout_ids) < args.seq_len + 1 or len(train_ids) < args.seq_len + 2:
        raise SystemExit("too little text for one window at --seq-len; raise the byte caps")

    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                     pad_token=EOS, model_max_length=args.max_position_embeddings)
    hf_tok.save_pretrained(out)

    config = build_config(args, tok.get_vocab_size(), eos_id)
    model = LlamaForCausalLM(config).to(args.device)  # seeded init
    model.config.use_cache = False
    result = train(model, train_ids, heldout_ids, args, log)
    log_f.close()

    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(out)
    weights = out / "model.safetensors"
    data = dict(dstats, train_tokens=len(train_ids), heldout_tokens=len(heldout_ids),
                vocab_size=tok.get_vocab_size(), eos_id=eos_id, tokenizer_bytes=tok_bytes)
    info = dict(
        data=data, result=result, config=model.config.to_dict(), n_params=n_params,
        file_bytes=weights.stat().st_size,
        sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        roots=[(label, str(p)) for label, p in source_roots(args)],
        versions=versions(), hardware=hardware(args.device), commit=git_commit(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    write_card(out, args, argv, info)
    (out / "run_info.json").write_text(json.dumps(
        {k: v for k, v in info.items() if k != "config"} | {"args": vars(args)}, indent=1))
    print(f"saved to {out}: {info['file_bytes'] / 1e6:.1f} MB, {result['steps']} steps, "
          f"{result['tokens_seen']:,} tokens, held-out loss {result['heldout_loss']:.4f}")
    return dict(info, out=str(out))


if __name__ == "__main__":
    main()
