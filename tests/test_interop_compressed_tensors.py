"""aprender's sparse-24-bitmask output against the real compressed-tensors 0.14 and transformers 4
(``pip install ".[interop]"``; run with ``pytest -m interop``).  A tiny Llama model is built from
a config here (no download), saved with ``save_pretrained``, pruned 2:4 by aprender, and read back
by the loaders' own entry points; the weights must equal aprender's dense output bit for bit.  A
checkpoint compressed by compressed-tensors itself must densify to the same bits."""
import json
import math

import numpy as np
import pytest

from aprender.checkpoints import prune_checkpoint
from aprender.densify import densify_checkpoint
from aprender.io.formats import load_dense

pytestmark = pytest.mark.interop

try:  # not at collection through importorskip: the main run deselects these tests
    from compressed_tensors.compressors import ModelCompressor
    import torch
    import transformers
except ImportError as exc:
    MISSING = exc
else:
    MISSING = None


@pytest.fixture(autouse=True, scope="module")
def _interop_packages():
    if MISSING is not None:
        pytest.skip(f"needs the [interop] extra (compressed-tensors 0.14, transformers 4): "
                    f"{MISSING}")


def _bits(x):
    """A tensor's (or aprender array's) raw bits as a numpy integer array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous()
        return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]).numpy()
    a = getattr(x, "bits", x)
    return np.asarray(a).view({2: np.int16, 4: np.int32, 8: np.int64}[np.asarray(a).itemsize])


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def model_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch,
                                                                          request.param))
    with torch.no_grad():  # some exact negative values at positions that will be pruned
        model.model.layers[0].mlp.up_proj.weight[:, ::4] = -0.0
    d = tmp_path_factory.mktemp(f"llama-{request.param}") / "model"
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def pruned(model_dir):
    root = model_dir.parent
    prune_checkpoint(model_dir, root / "dense", pattern="2:4")
    report = prune_checkpoint(model_dir, root / "sp24", pattern="2:4",
                              format="sparse-24-bitmask")
    return root / "dense", root / "sp24", report


def _fresh(folder):
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg = cfg.to_dict()
    cfg.pop("quantization_config", None)
    cfg = transformers.LlamaConfig.from_dict(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(cfg.torch_dtype)


def _same(state, dense):
    names = [n for n in dense if n in state]
    assert len(names) == len(dense)
    for n in names:
        assert tuple(state[n].shape) == tuple(dense[n].shape), n
        np.testing.assert_array_equal(_bits(state[n]), _bits(dense[n]), err_msg=n)


def test_config_is_what_compressed_tensors_writes(pruned):
    dense_dir, sp24, report = pruned
    qc = json.loads((sp24 / "config.json").read_text())["quantization_config"]
    assert set(qc) == {"quant_method", "sparsity_config", "transform_config", "version"}
    comp = ModelCompressor.from_pretrained(str(sp24))
    assert comp is not None and comp.quantization_config is None
    sc = comp.sparsity_config
    assert sc.format == "sparse-24-bitmask" and sc.sparsity_structure == "2:4"
    dense = load_dense(dense_dir)
    zeros = sum(int(np.count_nonzero(_bits(a) == 0)) for n, a in dense.items()
                if n in {r["name"] for r in report["tensors"]})
    everything = sum(math.prod(a.shape) for a in dense.values())
    assert report["totals"]["pruned"] <= zeros
    assert sc.global_sparsity == pytest.approx(report["totals"]["pruned"] / everything, abs=0)


def test_model_compressor_decompresses_bit_identically(pruned):
    dense_dir, sp24, _ = pruned
    comp = ModelCompressor.from_pretrained(str(sp24))
    model = _fresh(sp24)
    comp.decompress(str(sp24), model)
    state = model.state_dict()
    dense = load_dense(dense_dir)
    _same(state, dense)
    # and every pruned position holds +0.0 (no -0.0 survived the seeded ones)
    up = _bits(state["model.layers.0.mlp.up_proj.weight"])
    assert not np.any(up == np.int16(-0x8000))


def test_transformers_from_pretrained_loads_it(pruned):
    dense_dir, sp24, _ = pruned
    model = transformers.AutoModelForCausalLM.from_pretrained(str(sp24), torch_dtype="auto")
    _same(model.state_dict(), load_dense(dense_dir))


def test_single_file_output_config_alongside(pruned, model_dir, tmp_path):
    out = tmp_path / "one.safetensors"
    prune_checkpoint(model_dir / "model.safetensors", out, pattern="2:4",
                     format="sparse-24-bitmask")
    side = tmp_path / "one.config.json"
    comp = ModelCompressor.from_pretrained(str(side))
    assert comp.sparsity_config.format == "sparse-24-bitmask"
    # the file's neighbour config.json made the sidecar a whole model config
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(out.read_bytes())
    (folder / "config.json").write_text(side.read_text())
    model = _fresh(folder)
    comp.decompress(str(folder), model)
    _same(model.state_dict(), load_dense(pruned[0]))


def test_densify_a_checkpoint_compressed_by_compressed_tensors(pruned, tmp_path):
    dense_dir, _, report = pruned
    from compressed_tensors.config import Sparse24BitMaskConfig
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(str(dense_dir), torch_dtype="auto")
    targets = sorted(r["name"][:-len(".weight")] for r in report["tensors"])
    comp = ModelCompressor(sparsity_config=Sparse24BitMaskConfig(targets=targets))
    state = comp.compress(model)
    folder = tmp_path / "by-ct"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text((dense_dir / "config.json").read_text())
    comp.update_config(str(folder))
    assert "sparsity_config" in json.loads((folder / "config.json").read_text())[
        "quantization_config"]
    out = tmp_path / "densified"
    rep = densify_checkpoint(folder, out)
    assert rep["decoded"] == {"sparse-24-bitmask": len(targets)}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    _same({k: v for k, v in load_dense(out).items()}, load_dense(dense_dir))
