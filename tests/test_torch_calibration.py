"""aprender.torch.collect_calibration and prune_(importance="wanda")."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aprender import _reference as ref  # noqa: E402
from aprender._validation import prune_count  # noqa: E402
from aprender.pruning import (ActivationStats, CalibrationContext,  # noqa: E402
                              CalibrationError, CalibrationRequiredError, InvalidArgumentError,
                              InvalidCalibrationError, InvalidSparsityError,
                              MissingActivationStatsError, NumericalInstabilityError,
                              WandaImportance, owl_sparsities)
from aprender.torch import collect_calibration, prune_, to_numpy_view  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.up = torch.nn.Linear(d, h)
        self.act = torch.nn.ReLU()
        self.down = torch.nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class Tiny(torch.nn.Module):
    """(batch, seq) token ids -> embeddings -> two blocks -> head; takes attention_mask."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([Block(d), Block(d)])
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask=None):
        assert not torch.is_grad_enabled()
        x = self.dropout(self.embed(input_ids))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def capture_inputs(model, batches, call):
    """The inputs every Linear receives, captured independently of aprender."""
    seen = {}
    model.eval()
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().clone()))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for b in batches:
                call(model, b)
    finally:
        for h in hooks:
            h.remove()
    return seen


def as_np(t):
    v = to_numpy_view(t)
    return v.bits.view(__import__("ml_dtypes").bfloat16) if hasattr(v, "bits") else v


def make_batches(n=3, b=2, s=7, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, s), generator=g) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_collect_equals_reference_per_batch(dtype):
    torch.manual_seed(0)
    model = Tiny().to(dtype).eval()
    batches = make_batches()
    ctx = collect_calibration(model, batches, progress=False)
    inputs = capture_inputs(model, batches, lambda m, b: m(b))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert ctx.layer_names == names
    assert ctx.num_samples == 6
    for name in names:
        expect = None
        for x in inputs[name]:  # one update per batch, in the kernel's documented order
            expect = ref.sum_squares(as_np(x), start=expect)
        np.testing.assert_array_equal(ctx[name].sum_squares, expect)
        assert ctx[name].count == 3 * 2 * 7


def test_padding_tokens_are_not_counted():
    torch.manual_seed(1)
    model = Tiny()
    ids = make_batches(n=2, b=3, s=6, seed=2)
    masks = [torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]),
             torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])]
    batches = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, masks)]
    ctx = collect_calibration(model, batches, progress=False)
    assert ctx.num_samples == 6
    inputs = capture_inputs(model, batches, lambda mod, b: mod(**b))
    for name in ctx:
        expect = ActivationStats(ctx[name].in_features)
        for x, m in zip(inputs[name], masks):
            expect.update(x[m.bool()].numpy())
        assert ctx[name] == expect
        assert ctx[name].count == 11 + 10
    # bool masks work the same; an additive mask is refused
    bool_batches = [{"input_ids": i, "attention_mask": m.bool()} for i, m in zip(ids, masks)]
    assert collect_calibration(model, bool_batches, progress=False) == ctx
    additive = [{"input_ids": ids[0], "attention_mask": (1 - masks[0].float()) * -1e9}]
    with pytest.raises(CalibrationError, match="0 .*and 1"):
        collect_calibration(model, additive, progress=False)


class FeaturesDict(torch.nn.Module):
    """The first module of a sentence-transformers model: one dict of features in and out."""

    def __init__(self):
        super().__init__()
        self.auto_model = Tiny()

    def forward(self, features):
        return {**features, "emb": self.auto_model(features["input_ids"],
                                                   features.get("attention_mask"))}


def test_a_sequential_of_dict_modules_takes_the_tokenizer_dict_whole():
    """sentence-transformers models are nn.Sequential modules whose forward takes the features
    dict positionally: collect_calibration passes a dict batch that way, and the statistics
    equal those of the wrapped model, under the wrapper's names (as prune_ sees them)."""
    torch.manual_seed(1)
    st_like = torch.nn.Sequential(FeaturesDict())
    ids = make_batches(n=2, b=3, s=6, seed=2)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    batches = [{"input_ids": i, "attention_mask": mask} for i in ids]
    ctx = collect_calibration(st_like, batches, progress=False)
    inner = collect_calibration(st_like[0].auto_model, batches, progress=False)
    assert ctx.layer_names == ["0.auto_model." + n for n in inner.layer_names]
    for n in inner:
        assert ctx["0.auto_model." + n] == inner[n]


class Flattening(torch.nn.Module):
    """A model whose Linear sees (batch * seq, features): the mask cannot be matched."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, attention_mask=None):
        return self.fc(x.reshape(-1, 4))


def test_inputs_whose_shape_does_not_match_the_mask_count_every_token():
    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    ctx = collect_calibration(Flattening(), [{"x": x, "attention_mask": mask}], progress=False)
    assert ctx["fc"].count == 10
    assert ctx["fc"] == ActivationStats(4).update(x.reshape(-1, 4))


def test_layers_filter_and_batch_forms():
    model = Tiny()
    batches = make_batches(n=1)
    assert collect_calibration(model, batches, layers="up", progress=False).layer_names == \
        ["layers.0.up", "layers.1.up"]
    assert collect_calibration(model, batches, layers=["head", r"layers\.1\.down"],
                               progress=False).layer_names == ["layers.1.down", "head"]
    assert collect_calibration(model, batches, layers=lambda n, m: m.out_features == 8,
                               progress=False).layer_names == ["layers.0.down", "layers.1.down"]
    with pytest.raises(InvalidArgumentError, match="not an nn.Linear"):
        collect_calibration(model, batches, layers="layers.0", progress=False)
    with pytest.raises(InvalidArgumentError, match="no nn.Linear"):
        collect_calibration(model, batches, layers="nothing", progress=False)
    with pytest.raises(InvalidArgumentError):
        collect_calibration(model, batches, layers=["(unclosed"], progress=False)
    with pytest.raises(InvalidArgumentError):
        collect_calibration(model, batches, layers=3, progress=False)
    # tuples are positional arguments; a lone tensor or dict must be wrapped in a list
    a = collect_calibration(model, [(b,) for b in batches], progress=False)
    assert a == collect_calibration(model, batches, progress=False)
    with pytest.raises(InvalidArgumentError, match="wrap"):
        collect_calibration(model, batches[0], progress=False)
    with pytest.raises(InvalidArgumentError, match="batch"):
        collect_calibration(model, [3], progress=False)
    with pytest.raises(InvalidArgumentError):
        collect_calibration(torch.ones(3), batches)
    # a generator and the progress bar (tqdm, when installed)
    g = (b for b in batches)
    assert collect_calibration(model, g, progress=True) == a


def test_hooks_removed_and_modes_restored_even_on_error():
    model = Tiny()
    model.train()
    model.layers[1].eval()  # a mixed state is restored as it was
    before = {n: m.training for n, m in model.named_modules()}
    ctx = collect_calibration(model, make_batches(n=1), hessian=True, progress=False)
    assert ctx["head"].has_hessian
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.is_grad_enabled()

    class Boom(Exception):
        pass

    def boom(*_):
        raise Boom

    with pytest.raises(Boom):
        collect_calibration(model, (boom() for _ in range(1)), progress=False)
    with torch.no_grad():
        model.embed.weight[3, 2] = float("nan")
    with pytest.raises(NumericalInstabilityError, match="layer layers.0.up"):
        collect_calibration(model, [torch.tensor([[3, 4]])], progress=False)
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_layers_never_called_are_left_out():
    model = Tiny()
    model.extra = torch.nn.Linear(3, 3)  # registered, never called
    ctx = collect_calibration(model, make_batches(n=1), progress=False)
    assert "extra" not in ctx and "head" in ctx


# ----------------------------------------------------------------------------------------------
# prune_(importance="wanda")
# ----------------------------------------------------------------------------------------------

def test_prune_wanda_per_row_default_and_patterns():
    torch.manual_seed(3)
    model = Tiny()
    ctx = collect_calibration(model, make_batches(), progress=False)
    original = copy.deepcopy(model)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    report = prune_(model, 0.5, importance="wanda", calibration=ctx)
    assert [r["name"] for r in report] == [f"{n}.weight" for n in before]
    for name, w0 in before.items():
        scores = WandaImportance(name).compute(w0, ctx).values
        expect = ref.per_row_mask(scores, 0.5)
        w = dict(model.named_modules())[name].weight.detach().numpy()
        np.testing.assert_array_equal(w[~expect], 0)
        np.testing.assert_array_equal(w[expect], w0.numpy()[expect])
    # N:M along the input dimension, unstructured, global
    for pattern, scope in (("2:4", "layer"), ("unstructured", "layer"),
                           ("unstructured", "global")):
        m2 = copy.deepcopy(original)
        prune_(m2, None if pattern == "2:4" else 0.5, pattern=pattern, scope=scope,
               importance="wanda", calibration=ctx)
        scores = {n: WandaImportance(n).compute(w0, ctx).values for n, w0 in before.items()}
        if scope == "global":
            keeps = dict(zip(scores, ref.global_masks(list(scores.values()), 0.5)))
        elif pattern == "2:4":
            keeps = {n: ref.nm_mask(s, 2, 4) for n, s in scores.items()}
        else:
            keeps = {n: ref.unstructured_mask(s, 0.5) for n, s in scores.items()}
        for n, keep in keeps.items():
            w = dict(m2.named_modules())[n].weight.detach().numpy()
            np.testing.assert_array_equal(w[~keep], 0)
            np.testing.assert_array_equal(w[keep], before[n].numpy()[keep])


def test_prune_wanda_with_owl_sparsities():
    torch.manual_seed(4)
    model = Tiny()
    ctx = collect_calibration(model, make_batches(), progress=False)
    scores = {n: WandaImportance(n).compute(m, ctx) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    alloc = owl_sparsities(scores, 0.6, lam=0.1)
    report = prune_(model, alloc.as_dict(), pattern="unstructured", importance="wanda",
                    calibration=ctx)
    pruned = {r["name"][:-len(".weight")]: r["total"] - r["kept"] for r in report}
    assert pruned == dict(zip(alloc.names, alloc.counts))
    assert sum(pruned.values()) == prune_count(0.6, alloc.total)
    with pytest.raises(InvalidSparsityError, match="no entry"):
        prune_(model, {"head": 0.5}, importance="wanda", calibration=ctx)
    with pytest.raises(InvalidSparsityError):
        prune_(model, alloc.as_dict(), pattern="2:4", importance="wanda", calibration=ctx)


def test_prune_wanda_errors(tmp_path):
    model = Tiny()
    ctx = collect_calibration(model, make_batches(n=1), layers="up", progress=False)
    with pytest.raises(CalibrationRequiredError):
        prune_(model, 0.5, importance="wanda")
    with pytest.raises(MissingActivationStatsError, match="layers.0.down"):
        prune_(model, 0.5, importance="wanda", calibration=ctx)
    with pytest.raises(InvalidCalibrationError):
        prune_(model, 0.5, importance="wanda", calibration=ctx["layers.0.up"])
    with pytest.raises(InvalidCalibrationError):
        prune_(model, 0.5, importance="wanda", calibration="ctx.safetensors")
    with pytest.raises(CalibrationError, match="no Hessian"):  # collected without hessian=True
        prune_(model, 0.5, importance="sparsegpt", calibration=ctx)
    with pytest.raises(InvalidArgumentError, match="importance must be one of"):
        prune_(model, 0.5, importance="obs", calibration=ctx)
    # magnitude pruning accepts (and ignores) calibration
    prune_(model, 0.5, importance="l1", calibration=ctx)
    # a file round trip gives the same masks
    full = Tiny()
    c = collect_calibration(full, make_batches(n=2), progress=False)
    c.save(tmp_path / "c.safetensors")
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    prune_(a, 0.5, importance="wanda", calibration=c)
    prune_(b, 0.5, importance="wanda",
           calibration=CalibrationContext.load(tmp_path / "c.safetensors"))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
