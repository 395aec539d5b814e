"""Model families for structured exports, as data: which tensors' rows or columns each axis
slices, and which ``config.json`` fields say how wide an axis is.

A family entry names the prefix of its transformer blocks (``model.layers.``), and for every
tensor of a block that an axis cuts, a :class:`Rule`: a regular expression for the rest of the
name, the tensor axis that is cut, and the *segments* that axis is made of, in order:

* ``mlp``: the dense MLP's intermediate channels (width: ``mlp_width``, e.g.
  ``intermediate_size``); Phi-3's fused ``gate_up_proj`` is two ``mlp`` segments;
* ``emlp``: one routed expert's intermediate channels (width: ``expert_width``);
* ``q``: the query heads, ``num_attention_heads * head_dim`` (a KV group keeps its
  ``num_attention_heads / num_key_value_heads`` query heads);
* ``kv``: the key/value heads, ``num_key_value_heads * head_dim``;
* ``router``: one row per routed expert.

Tensors of a block that no rule names and ``keep`` lists (norms, per-head ``q_norm``/``k_norm``
of ``head_dim`` values shared by every head, output biases) are copied unchanged; a block tensor
neither a rule nor ``keep`` knows is refused when a width axis is cut (its layout is unknown).
Routed experts are the block tensors matching ``expert``; removing one drops its tensors and its
router row, and the kept experts are renumbered.  Dropping a layer drops every tensor of its
block and renumbers the blocks after it.

Adding a family is an entry here (and a tiny-model test), not a new code path.
"""
import re
from dataclasses import dataclass

__all__ = ["Rule", "Family", "FAMILIES", "family_for", "SEGMENTS"]

SEGMENTS = ("mlp", "emlp", "q", "kv", "router")


@dataclass(frozen=True)
class Rule:
    """Tensors (the part of the name after ``<layer prefix><i>.``, a full match of ``pattern``)
    whose ``axis`` is the concatenation of ``segments``."""
    pattern: str
    axis: int
    segments: tuple


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple
    layer_prefix: str          # regex for the text before the block index
    rules: tuple
    keep: tuple = ()           # regexes of block tensors no axis changes
    mlp_width: str = "intermediate_size"
    expert_width: str = None   # config field of one expert's intermediate size
    expert: str = None         # regex (one group: the expert index) of routed-expert tensors
    expert_counts: tuple = ("num_experts", "num_local_experts")
    heads: str = None          # None: heads can be cut; otherwise why they cannot
    layer_lists: tuple = ("layer_types",)       # per-layer lists, one entry per layer
    index_lists: tuple = ("mlp_only_layers",)   # lists of layer indices
    count_fields: tuple = ("max_window_layers",)  # "the first N layers" counts

    def rule_for(self, rest):
        """The Rule matching a block tensor's name (after the block prefix), or None."""
        for r in self.rules:
            if re.fullmatch(r.pattern, rest):
                return r
        return None

    def kept_as_is(self, rest):
        return any(re.fullmatch(p, rest) for p in self.keep)


def _attention():
    return (Rule(r"self_attn\.q_proj\.(weight|bias)", 0, ("q",)),
            Rule(r"self_attn\.[kv]_proj\.(weight|bias)", 0, ("kv",)),
            Rule(r"self_attn\.o_proj\.weight", 1, ("q",)))


def _mlp(up=r"mlp\.(gate|up)_proj", down=r"mlp\.down_proj", seg="mlp"):
    """Regexes (not escaped) of the MLP's input projections and its output projection."""
    return (Rule(rf"{up}\.(weight|bias)", 0, (seg,)), Rule(rf"{down}\.weight", 1, (seg,)))


_DECODER = r"(?:model\.|model\.language_model\.|language_model\.model\.)layers\."
_NORMS = (r"[a-z_]*layernorm\.weight", r"self_attn\.[qk]_norm\.weight",
          r"self_attn\.o_proj\.bias", r"mlp\.down_proj\.bias")

_LLAMA_LIKE = dict(layer_prefix=_DECODER, rules=_attention() + _mlp(), keep=_NORMS)

FAMILIES = (
    Family("llama", ("llama",), **_LLAMA_LIKE),
    Family("qwen2", ("qwen2",), **_LLAMA_LIKE),
    Family("qwen3", ("qwen3",), **_LLAMA_LIKE),
    Family("mistral", ("mistral",), **_LLAMA_LIKE),
    Family("gemma3", ("gemma3_text",), **_LLAMA_LIKE),  # Gemma 3 multimodal: its text_config
    Family("phi3", ("phi3",), layer_prefix=_DECODER,
           rules=(Rule(r"self_attn\.qkv_proj\.weight", 0, ("q", "kv", "kv")),
                  Rule(r"self_attn\.o_proj\.weight", 1, ("q",)),
                  Rule(r"mlp\.gate_up_proj\.weight", 0, ("mlp", "mlp")),
                  Rule(r"mlp\.down_proj\.weight", 1, ("mlp",))),
           keep=_NORMS),
    Family("qwen3_moe", ("qwen3_moe",), layer_prefix=_DECODER,
           rules=(_attention() + _mlp()
                  + _mlp(up=r"mlp\.experts\.\d+\.(gate|up)_proj",
                         down=r"mlp\.experts\.\d+\.down_proj", seg="emlp")
                  + (Rule(r"mlp\.gate\.weight", 0, ("router",)),)),
           keep=_NORMS, expert=r"mlp\.experts\.(\d+)\.", expert_width="moe_intermediate_size"),
    Family("mixtral", ("mixtral",), layer_prefix=_DECODER,
           rules=(_attention()
                  + _mlp(up=r"block_sparse_moe\.experts\.\d+\.w[13]",
                         down=r"block_sparse_moe\.experts\.\d+\.w2", seg="emlp")
                  + (Rule(r"block_sparse_moe\.gate\.weight", 0, ("router",)),)),
           keep=_NORMS, expert=r"block_sparse_moe\.experts\.(\d+)\.",
           expert_width="intermediate_size"),
    Family("bert", ("bert",), layer_prefix=r"(?:bert\.)?encoder\.layer\.",
           rules=(Rule(r"intermediate\.dense\.(weight|bias)", 0, ("mlp",)),
                  Rule(r"output\.dense\.weight", 1, ("mlp",))),
           keep=(r"attention\..*", r"output\.dense\.bias", r"output\.LayerNorm\.(weight|bias)"),
           heads="BERT derives its head size from hidden_size / num_attention_heads and has no "
                 "head_dim setting, so fewer heads cannot be expressed in its config"),
)

for _f in FAMILIES:  # the table's own consistency (a typo would otherwise surface in an export)
    for _r in _f.rules:
        assert set(_r.segments) <= set(SEGMENTS), (_f.name, _r)
        re.compile(_r.pattern)


def family_for(model_type):
    """The Family of a config's ``model_type``, or None."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    return None
