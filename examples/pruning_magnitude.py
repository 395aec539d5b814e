"""Magnitude pruning with aprender: the case study's report, with real computed values.

    python examples/pruning_magnitude.py [--seed N]
"""
import argparse
import sys

import numpy as np

from aprender.nn import Linear
from aprender.pruning import (MagnitudeImportance, SparsityPattern, generate_nm_mask,
                              generate_unstructured_mask)

WIDTH = 62  # inner width of the boxes


def box_title(lines):
    print("╔" + "═" * WIDTH + "╗")
    for text in lines:
        print("║" + text.center(WIDTH) + "║")
    print("╚" + "═" * WIDTH + "╝")


def box_table(title, rows):
    print("╔" + "═" * WIDTH + "╗")
    print("║" + title.center(WIDTH) + "║")
    print("╠" + "═" * WIDTH + "╣")
    for text in rows:
        print("║  " + text.ljust(WIDTH - 2) + "║")
    print("╚" + "═" * WIDTH + "╝")


def show_stats(scores):
    print(f"   Method: {scores.method}")
    print("   Stats:")
    print(f"   - Min: {scores.stats.min:.6f}")
    print(f"   - Max: {scores.stats.max:.6f}")
    print(f"   - Mean: {scores.stats.mean:.6f}")
    print(f"   - Std: {scores.stats.std:.6f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42, help="seed of the layer's initialisation")
    args = parser.parse_args(argv)

    box_title(["Magnitude Pruning with Aprender", "Prune neural networks by weight magnitude"])

    layer = Linear(16, 8, seed=args.seed)
    weights = layer.weight
    print(f"📊 Creating Linear Layer ({layer.in_features} → {layer.out_features})")
    print(f"   Weight shape: [{weights.shape[0]}, {weights.shape[1]}]")
    print(f"   Total parameters: {weights.size}")

    print("🔬 Computing L1 Magnitude Importance")
    l1 = MagnitudeImportance.l1().compute(layer)
    show_stats(l1)

    print("🔬 Computing L2 Magnitude Importance")
    l2 = MagnitudeImportance.l2().compute(layer)
    show_stats(l2)

    print("✂️  Generating Unstructured Mask (50% sparsity)")
    mask = generate_unstructured_mask(l1, 0.5)
    print(f"   Achieved sparsity: {mask.sparsity() * 100:.1f}%")
    print(f"   Non-zero weights: {mask.nnz()}")
    print(f"   Pruned weights: {mask.num_zeros()}")

    print("✂️  Generating 2:4 N:M Mask (50% structured sparsity)")
    nm_layer = Linear(8, 8, seed=args.seed + 1)
    nm_scores = MagnitudeImportance.l1().compute(nm_layer)
    nm = generate_nm_mask(nm_scores, 2, 4)
    pattern = SparsityPattern.nm(2, 4)
    print(f"   Pattern: {pattern} ({pattern.n} non-zeros per {pattern.m} elements)")
    print(f"   Achieved sparsity: {nm.sparsity() * 100:.1f}%")
    keep = np.asarray(nm).reshape(-1, 4)
    valid = int(np.count_nonzero(keep.sum(axis=1) == 2))  # verify every group, as the study does
    print(f"   Valid 2:4 groups: {valid}/{keep.shape[0]}")
    if valid != keep.shape[0]:
        print("   ERROR: some groups are not 2:4", file=sys.stderr)
        return 1

    print("📉 Applying Mask to Weights")
    pruned = weights.copy()
    mask.apply(pruned)
    zeros = int(np.count_nonzero(pruned == 0))
    print(f"   Zeros after pruning: {zeros} ({zeros / pruned.size * 100:.1f}%)")

    total = weights.size
    removed = mask.num_zeros()
    box_table("Pruning Summary", [
        f"Original parameters: {total}",
        f"Pruned parameters:   {removed} ({removed / total * 100:.0f}% reduction)",
        f"Remaining parameters: {total - removed}",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
