"""aprender.structured.export_structured on a tiny model of every family and every axis it
supports: the export loads in transformers with no missing or unexpected keys and its float32
outputs equal the original model's with the same layers skipped and channels, heads and experts
masked (tests/shrink_models.py), to 1e-5 relative.  Also: config.json edited field by field,
sharded inputs, and refused plans and folders."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import shrink_models as sm  # noqa: E402
from aprender.errors import CheckpointError, InvalidArgumentError, ShapeMismatchError  # noqa: E402
from aprender.structured.export import export_structured  # noqa: E402

FAMILIES = sm.families()
CASES = [(f, (a,)) for f, (_, _, axes) in FAMILIES.items() for a in axes] + \
    [(f, axes) for f, (_, _, axes) in FAMILIES.items()]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = sm.build(family, str(tmp_path_factory.mktemp(family) / "model"))
        return made[family]
    return get


def _export(src, out, plan):
    return export_structured(src, out, plan)


@pytest.mark.parametrize("family,axes", CASES, ids=[f"{f}-{'+'.join(a)}" for f, a in CASES])
def test_slicing_equals_masking(family, axes, sources, tmp_path):
    err, plan, out = sm.check(family, sources(family), axes, str(tmp_path), _export)
    meta_cfg = json.load(open(os.path.join(out, "config.json")))
    if "layers" in axes:
        assert meta_cfg["num_hidden_layers"] == 2
    if "heads" in axes:
        assert meta_cfg["num_key_value_heads"] == 1
        assert meta_cfg["num_attention_heads"] == sm.HEADS // sm.KV
        assert meta_cfg["head_dim"] == sm.HD  # explicit, also where the family derives it


def test_gemma3_layer_types_and_tied_embeddings(sources, tmp_path):
    src = sources("gemma3")
    export_structured(src, tmp_path / "o", {"layers_kept": [0, 2]})
    cfg = json.load(open(tmp_path / "o" / "config.json"))
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert cfg["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "np") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["aprender_shrink"])
    assert "lm_head.weight" not in names and "model.layers.1.self_attn.q_norm.weight" in names
    assert not any(n.startswith("model.layers.2.") for n in names)
    assert meta["layers_removed"] == [1]


def test_config_edited_in_its_own_text(sources, tmp_path):
    """Only the changed values differ; every other line (order, spelling) is the input's."""
    src = sources("qwen2")
    export_structured(src, tmp_path / "o", {"kv_heads": {0: [1], 1: [0], 2: [1]}})
    a = open(os.path.join(src, "config.json")).read().splitlines()
    b = open(tmp_path / "o" / "config.json").read().splitlines()
    changed = [line for line in b if line not in a]
    assert sorted(x.strip() for x in changed) == ['"head_dim": 8,', '"num_attention_heads": 2,',
                                                  '"num_key_value_heads": 1,']
    assert [line for line in a if line not in b] == ['  "num_attention_heads": 4,',
                                                     '  "num_key_value_heads": 2,']


def test_sharded_input(sources, tmp_path):
    """A sharded input: shards rewritten, the emptied ones left out, the index rebuilt."""
    _imports = sm.families()  # noqa: F841
    src = tmp_path / "sharded"
    model = sm.transformers.AutoModelForCausalLM.from_pretrained(sources("llama"))
    model.save_pretrained(src, max_shard_size="20KB")
    index = json.load(open(src / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    (src / "tokenizer.json").write_text('{"x": 1}')
    err, plan, out = sm.check("llama", str(src), ("layers", "mlp", "heads"), str(tmp_path),
                              _export)
    new = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = set(new["weight_map"].values())
    assert all(os.path.exists(os.path.join(out, s)) for s in shards)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == sorted(shards)
    assert not any(".layers.2." in n for n in new["weight_map"])
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"x": 1}'
    from safetensors import safe_open
    total = 0
    for s in shards:
        with safe_open(os.path.join(out, s), "np") as f:
            total += sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1]
                         * 4 for k in f.keys())
    assert new["metadata"]["total_size"] == total


def test_replacements_are_written(sources, tmp_path):
    src = sources("llama")
    plan = {"mlp_channels": {i: list(range(0, sm.I, 2)) for i in range(sm.L)}}
    new = np.full((sm.H, sm.I // 2), 0.25, np.float32)
    export_structured(src, tmp_path / "o", plan,
                      replacements={"model.layers.1.mlp.down_proj.weight": new})
    from safetensors.numpy import load_file
    sd = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert np.array_equal(sd["model.layers.1.mlp.down_proj.weight"], new)
    with pytest.raises(ShapeMismatchError, match="shape"):
        export_structured(src, tmp_path / "p", plan,
                          replacements={"model.layers.1.mlp.down_proj.weight": new[:, :3]})
    with pytest.raises(InvalidArgumentError, match="not a tensor the export writes"):
        export_structured(src, tmp_path / "p", {"layers_kept": [0, 2]},
                          replacements={"model.layers.1.mlp.down_proj.weight": new})
    assert not os.path.exists(tmp_path / "p")


# -- refused -----------------------------------------------------------------------------------

@pytest.mark.parametrize("plan,match", [
    ({"layers_kept": [2, 0]}, "sorted and unique"),
    ({"layers_kept": [0, 0]}, "sorted and unique"),
    ({"layers_kept": [0, 3]}, r"out of range \[0, 3\)"),
    ({"layers_kept": []}, "keeps nothing"),
    ({"layers_kept": [True]}, "integer indices"),
    ({"mlp_channels": {0: [48]}}, r"out of range \[0, 48\)"),
    ({"mlp_channels": {5: [1]}}, "not an index"),
    ({"layers_kept": [0, 2], "mlp_channels": {1: [1]}}, "not in layers_kept"),
    ({"mlp_channels": {0: [1, 2], 1: [1, 2, 3]}}, "intermediate_size is one number"),
    ({"mlp_channels": {0: [1, 2]}}, "intermediate_size is one number"),
    ({"kv_heads": {0: [2]}}, r"out of range \[0, 2\)"),
    ({"experts": {0: [1]}}, "no routed experts"),
    ({"heads": {0: [1]}}, "unknown axis"),
    ([1, 2], "plan must be a dict"),
])
def test_bad_plans(plan, match, sources, tmp_path):
    with pytest.raises(InvalidArgumentError, match=match):
        export_structured(sources("llama"), tmp_path / "o", plan)
    assert not os.path.exists(tmp_path / "o")


def test_experts_per_tok_above_kept(sources, tmp_path):
    with pytest.raises(InvalidArgumentError, match="num_experts_per_tok is 2 but the plan keeps 1"):
        export_structured(sources("mixtral"), tmp_path / "o",
                          {"experts": {i: [1] for i in range(sm.L)}})


def test_bert_heads_refused(sources, tmp_path):
    with pytest.raises(InvalidArgumentError, match="bert: attention heads cannot be removed: "
                                                   "BERT derives its head size"):
        export_structured(sources("bert"), tmp_path / "o", {"kv_heads": {0: [0, 1]}})


def test_unknown_family(sources, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for f in os.listdir(sources("llama")):
        (src / f).write_bytes(open(os.path.join(sources("llama"), f), "rb").read())
    cfg = (src / "config.json").read_text().replace('"llama"', '"gpt\\u001b[31mneo"')
    (src / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"model_type 'gpt\\x1b\[31mneo' is not a family"):
        export_structured(src, tmp_path / "o", {"layers_kept": [0]})


def test_unknown_block_tensor_refused_when_cutting(sources, tmp_path):
    from safetensors.numpy import load_file, save_file
    src = tmp_path / "m"
    src.mkdir()
    for f in os.listdir(sources("llama")):
        (src / f).write_bytes(open(os.path.join(sources("llama"), f), "rb").read())
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((16, 32), np.float32)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="extra_proj.weight.*not in aprender's llama table"):
        export_structured(src, tmp_path / "o", {"kv_heads": {i: [0] for i in range(sm.L)}})
    export_structured(src, tmp_path / "o", {"layers_kept": [0, 1]})  # layers only: renumbered


def test_config_disagreeing_with_shapes(sources, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for f in os.listdir(sources("llama")):
        (src / f).write_bytes(open(os.path.join(sources("llama"), f), "rb").read())
    (src / "config.json").write_text((src / "config.json").read_text().replace(
        '"intermediate_size": 48', '"intermediate_size": 40'))
    with pytest.raises(CheckpointError,
                       match=r"axis [01] has 48 entries but the config says 40 \(mlp\)"):
        export_structured(src, tmp_path / "o", {"mlp_channels": {i: [0] for i in range(sm.L)}})


def test_output_rules(sources, tmp_path):
    src = sources("llama")
    with pytest.raises(CheckpointError, match="inside the input folder"):
        export_structured(src, os.path.join(src, "out"), {"layers_kept": [0]})
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_structured(src, tmp_path / "o", {"layers_kept": [0]})
    export_structured(src, tmp_path / "o", {"layers_kept": [0]}, force=True)
    assert json.load(open(tmp_path / "o" / "config.json"))["num_hidden_layers"] == 1
    with pytest.raises(CheckpointError, match="needs a model folder"):
        export_structured(os.path.join(src, "model.safetensors"), tmp_path / "f.safetensors",
                          {"layers_kept": [0]})


def test_moe_every_other_layer(tmp_path):
    """Qwen3-MoE with decoder_sparse_step 2 (layer 1 MoE, 0 and 2 dense): once layer 0 is
    dropped the step no longer says which layers are MoE, so the export lists the dense ones
    (mlp_only_layers, step 1); dense and expert MLPs keep their own widths."""
    src = sm.build("qwen3_moe", str(tmp_path / "model"), decoder_sparse_step=2)
    plan = {"layers_kept": [1, 2], "experts": {1: [0, 1, 3]},
            "mlp_channels": {1: [0, 2, 4, 6, 8, 10, 12, 14], 2: list(range(0, sm.I, 2))}}
    export_structured(src, tmp_path / "o", plan)
    cfg = json.load(open(tmp_path / "o" / "config.json"))
    assert (cfg["decoder_sparse_step"], cfg["mlp_only_layers"]) == (1, [1])
    assert (cfg["moe_intermediate_size"], cfg["intermediate_size"]) == (8, sm.I // 2)
    sm.compare("qwen3_moe", src, str(tmp_path / "o"), plan, str(tmp_path))


def test_nested_text_config(sources, tmp_path):
    """A multimodal folder (Gemma 3: model_type gemma3, the text model's fields under
    text_config, its blocks under model.language_model.layers): the text_config fields change,
    the top level and other tensors stay."""
    from safetensors.numpy import load_file, save_file
    src = tmp_path / "m"
    src.mkdir()
    sd = load_file(os.path.join(sources("gemma3"), "model.safetensors"))
    sd = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    sd["model.vision_tower.encoder.layers.1.weight"] = np.ones(3, np.float32)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    text = json.load(open(os.path.join(sources("gemma3"), "config.json")))
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": text, "vision_config": {"num_hidden_layers": 3}}
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    export_structured(src, tmp_path / "o", {"layers_kept": [0, 2],
                                            "kv_heads": {0: [0], 2: [1]}})
    new = json.load(open(tmp_path / "o" / "config.json"))
    assert new["vision_config"] == {"num_hidden_layers": 3}
    t = new["text_config"]
    assert (t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"]) == \
        (2, 2, 1)
    assert t["layer_types"] == ["sliding_attention", "sliding_attention"]
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert "model.vision_tower.encoder.layers.1.weight" in out
    assert np.array_equal(out["model.language_model.layers.1.self_attn.k_proj.weight"],
                          sd["model.language_model.layers.2.self_attn.k_proj.weight"][8:16])


def test_symlink_out_of_folder_refused(sources, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for f in os.listdir(sources("llama")):
        (src / f).write_bytes(open(os.path.join(sources("llama"), f), "rb").read())
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", src / "tokenizer.json")
    with pytest.raises(CheckpointError, match="outside the checkpoint; refused"):
        export_structured(src, tmp_path / "o", {"layers_kept": [0]})
    assert not os.path.exists(tmp_path / "o")


def test_bfloat16_input(tmp_path):
    """16-bit weights are sliced as words (bit for bit) and a float32 replacement is rounded to
    the tensor's bfloat16."""
    model = sm.transformers.AutoModelForCausalLM.from_pretrained(
        sm.build("llama", str(tmp_path / "f32"))).to(sm.torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    from safetensors.torch import load_file
    plan = {"kv_heads": {i: [1] for i in range(sm.L)}}
    rep = np.full((sm.H, sm.H // 2), 1 / 3, np.float32)
    export_structured(tmp_path / "bf16", tmp_path / "o", plan,
                      replacements={"model.layers.0.self_attn.o_proj.weight": rep})
    a, b = load_file(str(tmp_path / "bf16" / "model.safetensors")), \
        load_file(str(tmp_path / "o" / "model.safetensors"))
    assert b["model.layers.1.self_attn.k_proj.weight"].dtype == sm.torch.bfloat16
    assert sm.torch.equal(b["model.layers.1.self_attn.k_proj.weight"],
                          a["model.layers.1.self_attn.k_proj.weight"][8:16])
    assert sm.torch.equal(b["model.layers.0.self_attn.o_proj.weight"],
                          sm.torch.full((sm.H, sm.H // 2), 1 / 3).to(sm.torch.bfloat16))


# -- config.json edited in its own text ----------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8) | \
    st.floats(allow_nan=False, allow_infinity=False)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=6), _values, min_size=1, max_size=6),
       indent=st.sampled_from([None, 2, 4, "\t"]), data=st.data())
def test_edit_members_changes_only_what_it_is_told(doc, indent, data):
    """Any document, any layout: the edited text parses to the document with the changed and
    inserted members (and nothing else changed); untouched members keep their text."""
    from aprender.io.jsonedit import edit_members
    ascii_ = data.draw(st.booleans())
    text = json.dumps(doc, indent=indent, ensure_ascii=ascii_)
    keys = list(doc)
    changed = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    changes = {k: data.draw(st.lists(st.integers(0, 9), max_size=4) | _scalars) for k in changed}
    new_key = "\x00new"
    inserts = [(data.draw(st.sampled_from(keys)), new_key, 8)]
    out = edit_members(text, (), changes, inserts)
    want = {**doc, **changes, new_key: 8}
    assert json.loads(out) == want
    for k in keys:
        if k not in changes:
            member = json.dumps({k: doc[k]}, indent=indent, ensure_ascii=ascii_)[1:-1]
            assert member.strip().split("\n")[0] in out


@pytest.mark.parametrize("layers", ["4", "1000000000000"])
def test_layer_count_must_match_the_blocks(sources, tmp_path, layers):
    src = tmp_path / "m"
    src.mkdir()
    for f in os.listdir(sources("llama")):
        (src / f).write_bytes(open(os.path.join(sources("llama"), f), "rb").read())
    (src / "config.json").write_text((src / "config.json").read_text().replace(
        '"num_hidden_layers": 3', f'"num_hidden_layers": {layers}'))
    with pytest.raises(CheckpointError, match=f"num_hidden_layers is {layers} but the "
                                              "checkpoint has no tensor of block 3"):
        export_structured(src, tmp_path / "o", {"layers_kept": [0]})
