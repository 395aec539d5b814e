"""External oracle: prune_(importance="wanda") against an independent PyTorch implementation of
Wanda written here (a skip fails CI).

The oracle follows the reference implementation's recipe: input norms accumulated with torch
(here in float64, from its own forward hooks), ``W_metric = |W| * ‖X_j‖`` in float32, per-row
pruning by ``torch.sort(W_metric, dim=-1, stable=True)`` (the first k indices of each row: the
lowest index first among ties), N:M by the same stable sort inside each group of M consecutive
inputs.  Masks must be equal, element for element, ties included (bfloat16 and float16 weights
have many equal magnitudes per row)."""
import copy

import pytest

torch = pytest.importorskip("torch")

from aprender.torch import collect_calibration, prune_  # noqa: E402

pytestmark = pytest.mark.oracle

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Model(torch.nn.Module):
    def __init__(self, d=64, h=96):
        super().__init__()
        self.q = torch.nn.Linear(d, d)
        self.up = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x, attention_mask=None):
        y = self.q(x)
        return y + self.down(torch.nn.functional.gelu(self.up(y)))


def oracle_norms(model, batches):
    """name -> float32 ‖X_j‖₂ over the real tokens, computed with torch alone."""
    sums, hooks = {}, []

    def make(name):
        def hook(mod, args):
            x = args[0].detach()
            mask = current.get("mask")
            if mask is not None:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        return hook

    current = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(make(name)))
    try:
        with torch.no_grad():
            for b in batches:
                if isinstance(b, dict):
                    current["mask"] = b.get("attention_mask")
                    model(**b)
                else:
                    current["mask"] = None
                    model(b)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.sqrt(s).to(torch.float32) for n, s in sums.items()}


def oracle_keep(weight, norm, sparsity=None, nm=None, per_row=True):
    metric = weight.detach().abs().to(torch.float32) * norm.reshape(1, -1)
    rows, cols = metric.shape
    keep = torch.ones_like(metric, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = metric.reshape(rows, cols // m, m)
        idx = torch.sort(groups, dim=-1, stable=True).indices[..., :m - n]
        return keep.reshape(rows, cols // m, m).scatter_(-1, idx, False).reshape(rows, cols)
    if per_row:
        k = int(cols * sparsity)
        idx = torch.sort(metric, dim=-1, stable=True).indices[:, :k]
        return keep.scatter_(1, idx, False)
    k = int(rows * cols * sparsity)
    idx = torch.sort(metric.reshape(-1), stable=True).indices[:k]
    return keep.reshape(-1).scatter_(0, idx, False).reshape(rows, cols)


def batches_for(dtype, seed, dicts=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        x = (torch.randn(4, 16, 64, generator=g) * torch.linspace(0.2, 3.0, 64)).to(dtype)
        if dicts:
            mask = torch.ones(4, 16, dtype=torch.long)
            mask[i % 4, 16 - 5 * (i + 1):] = 0
            out.append({"x": x, "attention_mask": mask})
        else:
            out.append(x)
    return out


def model_for(dtype, seed):
    torch.manual_seed(seed)
    return Model().to(dtype).eval()


CASES = [("per-row", 0.5, None), ("per-row", 0.75, None), ("2:4", None, (2, 4)),
         ("4:8", None, (4, 8)), ("unstructured", 0.5, None)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] + (f"-{c[1]}" if c[1] else "") for c in CASES])
@pytest.mark.parametrize("dicts", [False, True], ids=["tensors", "padded-dicts"])
def test_wanda_masks_equal_the_torch_oracle(dtype, case, dicts):
    pattern, sparsity, nm = case
    tdt = DTYPES[dtype]
    model = model_for(tdt, seed=len(pattern) + (sparsity or 0) * 10)
    batches = batches_for(tdt, seed=7, dicts=dicts)
    original = copy.deepcopy(model)
    norms = oracle_norms(original, batches)
    ctx = collect_calibration(model, batches, progress=False)
    prune_(model, sparsity, pattern=pattern, importance="wanda", calibration=ctx)
    ties = 0
    for name, mod in original.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        expect = oracle_keep(mod.weight, norms[name], sparsity, nm, per_row=pattern == "per-row")
        pruned = dict(model.named_modules())[name].weight.detach()
        got = pruned != 0
        w = mod.weight.detach()
        # weights that were zero already stay zero either way: compare where they were not
        nz = w != 0
        assert torch.equal(got[nz], expect[nz]), (name, pattern, dtype)
        assert torch.equal(pruned[expect], w[expect])
        ties += int(w.abs().to(torch.float32).unique().numel() < w.numel())
    if dtype != "float32":
        assert ties  # 16-bit weights repeat magnitudes: the tie rule was exercised
