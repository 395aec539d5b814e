"""Tiny models of every family ``aprender shrink`` supports, and the proof an export is right:
the exported checkpoint loads with no missing or unexpected keys, and its float32 outputs equal
the ORIGINAL model's with the same layers skipped, the same MLP channels and attention heads
masked (their columns of the output projection zeroed) and the removed experts' router logits
set to -inf.

The masking here is written from the models' checkpoint names, independently of aprender's
family table, and runs with whatever transformers is installed (5.x in the main environment,
4.57 in the interop one: tests/test_interop_shrink.py).
"""
import json
import os
import re

import numpy as np

torch = None
transformers = None


def _imports():
    global torch, transformers
    import torch as _torch
    import transformers as _transformers
    torch, transformers = _torch, _transformers


L, H, I, HEADS, KV, HD = 3, 32, 48, 4, 2, 8

# family -> (config factory, "causal"|"base", what it cuts: subset of layers/mlp/heads/experts)
def _configs():
    T = transformers
    common = dict(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                  num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64)
    return {
        "llama": (lambda: T.LlamaConfig(**common, head_dim=HD, tie_word_embeddings=False),
                  "causal", ("layers", "mlp", "heads")),
        "qwen2": (lambda: T.Qwen2Config(**common), "causal", ("layers", "mlp", "heads")),
        "qwen3": (lambda: T.Qwen3Config(**common, head_dim=HD), "causal",
                  ("layers", "mlp", "heads")),
        "mistral": (lambda: T.MistralConfig(**common, head_dim=HD, sliding_window=None),
                    "causal", ("layers", "mlp", "heads")),
        "gemma3": (lambda: T.Gemma3TextConfig(
            **common, head_dim=HD, sliding_window=4, tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
            "causal", ("layers", "mlp", "heads")),
        "phi3": (lambda: T.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                 "causal", ("layers", "mlp", "heads")),
        "qwen3_moe": (lambda: T.Qwen3MoeConfig(**common, head_dim=HD, moe_intermediate_size=16,
                                               num_experts=4, num_experts_per_tok=2),
                      "causal", ("layers", "mlp", "heads", "experts")),
        "mixtral": (lambda: T.MixtralConfig(**common, head_dim=HD, num_local_experts=4,
                                            num_experts_per_tok=2),
                    "causal", ("layers", "mlp", "heads", "experts")),
        "bert": (lambda: T.BertConfig(vocab_size=64, hidden_size=H, intermediate_size=I,
                                      num_hidden_layers=L, num_attention_heads=HEADS,
                                      max_position_embeddings=64),
                 "base", ("layers", "mlp")),
    }


def families():
    _imports()
    return _configs()


def auto_class(kind):
    return transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel


def build(family, path, **config):
    """Save a tiny float32 model of ``family`` (random weights, seeded) to ``path``;
    ``config``: attributes set on its config before the model is built."""
    _imports()
    make, kind, _ = _configs()[family]
    torch.manual_seed(0)
    cfg = make()
    for k, v in config.items():
        setattr(cfg, k, v)
    model = auto_class(kind).from_config(cfg).to(torch.float32)
    with torch.no_grad():  # random norms and biases too, so a wrongly kept one would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


# -- the plan of each axis, in the original numbering ----------------------------------------

def plan_for(family, axes, width=None):
    """A plan cutting ``axes`` of the tiny ``family`` model: drop layer 1, keep half the MLP
    channels (a different half per layer), one of the two KV groups, three of four experts."""
    rng = np.random.default_rng(7)
    cfg = json.load(open(os.path.join(width, "config.json"))) if width else {}
    plan = {}
    kept = [0, 2] if "layers" in axes else list(range(L))
    if "layers" in axes:
        plan["layers_kept"] = kept
    if "mlp" in axes:
        n = cfg.get("moe_intermediate_size") if family == "qwen3_moe" else I
        plan["mlp_channels"] = {i: sorted(rng.choice(n, n // 2, replace=False).tolist())
                                for i in kept}
    if "heads" in axes:
        plan["kv_heads"] = {i: [i % KV] for i in kept}
    if "experts" in axes:
        plan["experts"] = {i: sorted(rng.choice(4, 3, replace=False).tolist()) for i in kept}
    return plan


# -- the reference: the original model, masked ------------------------------------------------

def _layer_re(family):
    return r"encoder\.layer\.(\d+)\." if family == "bert" else r"model\.layers\.(\d+)\."


def masked_state(family, src, plan):
    """The original checkpoint's tensors with removed MLP channels' and attention heads'
    columns of the output projections zeroed (by checkpoint name, not by aprender's table)."""
    from safetensors.numpy import load_file

    sd = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(src, f)))
    lre = _layer_re(family)
    down = {"bert": r"output\.dense\.weight",
            "mixtral": r"block_sparse_moe\.experts\.\d+\.w2\.weight",
            "qwen3_moe": r"mlp\.(experts\.\d+\.)?down_proj\.weight"}.get(
        family, r"mlp\.down_proj\.weight")
    rep = HEADS // KV
    for name, w in sd.items():
        m = re.match(lre, name)
        if m is None:
            continue
        i, rest = int(m.group(1)), name[m.end():]
        if re.fullmatch(down, rest) and i in plan.get("mlp_channels", {}):
            drop = np.setdiff1d(np.arange(w.shape[1]), plan["mlp_channels"][i])
            w[:, drop] = 0
        if rest == "self_attn.o_proj.weight" and i in plan.get("kv_heads", {}):
            for g in range(KV):
                if g not in plan["kv_heads"][i]:
                    w[:, g * rep * HD:(g + 1) * rep * HD] = 0
    return sd


class _RouterMask:
    """A TorchFunctionMode setting removed experts' router logits to -inf: the router is the
    linear map with the layer's router weight (an nn.Linear in transformers 4, a router module
    in 5: both call F.linear with that parameter)."""

    def __init__(self, masks):
        from torch.overrides import TorchFunctionMode

        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func is torch.nn.functional.linear:
                    w = args[1] if len(args) > 1 else kwargs.get("weight")
                    drop = outer.masks.get(id(w))
                    if drop is not None:
                        out = out.clone()
                        out[..., drop] = float("-inf")
                return out

        self.masks = masks
        self.mode = Mode()


def reference_outputs(family, src, plan, ids, tmp):
    """The original model's outputs with the plan's removals masked."""
    _imports()
    _, kind, _ = _configs()[family]
    masked = os.path.join(tmp, "masked")
    os.makedirs(masked, exist_ok=True)
    from safetensors.numpy import save_file

    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(masked, f), "wb") as b:
                b.write(a.read())
    save_file(masked_state(family, src, plan), os.path.join(masked, "model.safetensors"),
              metadata={"format": "pt"})
    model = auto_class(kind).from_pretrained(masked).eval()
    layers = model.encoder.layer if family == "bert" else model.model.layers
    hooks = []
    for i, layer in enumerate(layers):
        if i not in plan.get("layers_kept", range(L)):
            def skip(mod, args, kwargs, out):
                h = args[0] if args else kwargs["hidden_states"]
                return h if isinstance(out, torch.Tensor) else (h,) + tuple(out[1:])
            hooks.append(layer.register_forward_hook(skip, with_kwargs=True))
    masks = {}
    params = dict(model.named_parameters())
    for i, keep in plan.get("experts", {}).items():
        key = next(k for k in params if re.fullmatch(
            rf"model\.layers\.{i}\.(mlp|block_sparse_moe)\.gate\.weight", k))
        masks[id(params[key])] = [e for e in range(4) if e not in keep]
    with torch.no_grad(), _RouterMask(masks).mode:
        out = _run(model, kind, ids)
    for h in hooks:
        h.remove()
    return out


def _run(model, kind, ids):
    out = model(input_ids=ids, use_cache=False) if kind == "causal" else model(input_ids=ids)
    return (out.logits if kind == "causal" else out.last_hidden_state).float()


def load_export(family, path):
    """The exported model, loaded by transformers; asserts nothing missing or unexpected."""
    _imports()
    _, kind, _ = _configs()[family]
    model, info = auto_class(kind).from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{family}: loading info {problems}"
    return model.eval()


def input_ids():
    _imports()
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 64, (2, 12), generator=g)


def assert_same(got, want, rtol=1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"
    return err


def compare(family, src, out, plan, tmp):
    """The relative error between the export at ``out`` and the masked original."""
    ids = input_ids()
    want = reference_outputs(family, src, plan, ids, tmp)
    model = load_export(family, out)
    with torch.no_grad():
        got = _run(model, _configs()[family][1], ids)
    return assert_same(got, want)


def check(family, src, axes, tmp, export):
    """Export ``src`` with the plan for ``axes`` (``export(src, out, plan)``) and compare the
    loaded export with the masked original; returns the relative error."""
    plan = plan_for(family, axes, src)
    out = os.path.join(tmp, "out")
    export(src, out, plan)
    return compare(family, src, out, plan, tmp), plan, out
