"""The catalogue of hostile model folders and calibration files against the model-level
commands, `aprender calibrate` (the block executor) and `aprender shrink` (the structured
exporter): each attack reproduced through the command line, with what must come out of it —
a one-line typed error naming the problem (exit 1, 2 for usage), no traceback, nothing left
behind.  The first group failed before its fix; the last test keeps the attacks that already
held (paths, special files, sizes) held.

Tiny models come from transformers' config classes (tests/shrink_models.py), never a hub.
"""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import shrink_models as sm  # noqa: E402
from test_calibrate_stream import samples, save_tokenizer  # noqa: E402

from aprender.cli import main  # noqa: E402
from aprender.pruning import ActivationStats, CalibrationContext  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (3 blocks) with a tokenizer, and a calibration text."""
    d = tmp_path_factory.mktemp("llama")
    src = sm.build("llama", str(d / "model"))
    save_tokenizer(src)
    (d / "t.txt").write_text("\n".join(samples(8)) + "\n")
    return src, str(d / "t.txt")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return sm.build("mixtral", str(tmp_path_factory.mktemp("mixtral") / "model"))


def _variant(src, dst, config=None, tensors=None):
    """A copy of the model folder ``src`` at ``dst`` with ``config`` merged into config.json
    and ``tensors(state_dict)`` applied to model.safetensors."""
    shutil.copytree(src, dst)
    if config:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if tensors:
        path = os.path.join(dst, "model.safetensors")
        sd = safetensors_numpy.load_file(path)
        tensors(sd)
        safetensors_numpy.save_file(sd, path, metadata={"format": "pt"})
    return str(dst)


def _calibration(path, blocks=(), layers=None, experts=None):
    """A format-2 calibration file: block statistics for ``blocks`` (prefixes), input
    statistics ``{layer: in_features}``, REAP statistics for ``experts`` (prefixes)."""
    ctx = CalibrationContext()
    rng = np.random.default_rng(0)
    for i, b in enumerate(blocks):
        ctx.add_block_stats(b, 10.0 - i, 20)
    for name, n in (layers or {}).items():
        st = ActivationStats(n)
        st.update(rng.standard_normal((16, n)))
        ctx.add_layer_stats(name, st)
    for e in experts or ():
        ctx.add_expert_stats(e, 5, 2.5)
    ctx.num_samples = 4
    ctx.save(str(path))
    return str(path)


def _fails(args, capsys, code, *needles):
    """``aprender ARGS`` exits ``code`` with one line on stderr holding every needle."""
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.count("\n") == 1 and err.startswith("aprender: error: "), err
    for n in needles:
        assert n in err, err
    return err


LLAMA_BLOCKS = [f"model.layers.{i}" for i in range(3)]


def _shrink(folder, out, *extra):
    return ["shrink", folder, "-o", str(out), "--quiet", *extra]


# -- fixed: config.json -------------------------------------------------------------------------

def test_calibrate_layer_count_beyond_the_weights(llama, tmp_path, capsys):
    """num_hidden_layers far beyond the tensors (10**9 built a billion modules on the meta
    device: a hang) is refused from the file, before transformers builds anything."""
    folder = _variant(llama[0], tmp_path / "m", config={"num_hidden_layers": 40})
    _fails(["calibrate", folder, "--text", llama[1], "-o", str(tmp_path / "c.safetensors")],
           capsys, 1, "num_hidden_layers is 40 but the checkpoint holds only 30 tensors")
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_calibrate_expert_count_in_a_sub_config(llama, tmp_path, capsys):
    """The same bound reaches nested sub-configs (a text_config's expert count)."""
    folder = _variant(llama[0], tmp_path / "m",
                      config={"text_config": {"num_local_experts": 10 ** 9}})
    _fails(["calibrate", folder, "--text", llama[1], "-o", str(tmp_path / "c.safetensors")],
           capsys, 1, "num_local_experts is 1000000000 but the checkpoint holds only")


def test_shrink_auto_map(llama, tmp_path, capsys):
    """A config naming its own code: the family table does not describe that architecture,
    so an export would load wrongly under the folder's code.  Refused as calibrate refuses."""
    folder = _variant(llama[0], tmp_path / "m",
                      config={"auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    _fails(_shrink(folder, tmp_path / "o", "--mlp", "0.5"), capsys, 1,
           "needs its own code (auto_map)")
    assert not os.path.exists(tmp_path / "o")


def test_shrink_layer_types_of_the_wrong_length(llama, tmp_path, capsys):
    """layer_types with one entry for three layers was copied through (wrong after a drop)."""
    folder = _variant(llama[0], tmp_path / "m", config={"layer_types": ["full_attention"]})
    _fails(_shrink(folder, tmp_path / "o", "--mlp", "0.5"), capsys, 1,
           "layer_types must list one entry per layer (num_hidden_layers = 3), got 1 entries")
    assert not os.path.exists(tmp_path / "o")


def test_shrink_layer_index_list_out_of_range(llama, tmp_path, capsys):
    folder = _variant(llama[0], tmp_path / "m", config={"mlp_only_layers": [0, 7]})
    _fails(_shrink(folder, tmp_path / "o", "--mlp", "0.5"), capsys, 1,
           "mlp_only_layers must be a list of layer indices in [0, 3)")


# -- fixed: weights -----------------------------------------------------------------------------

def test_shrink_tensor_missing_from_one_block(llama, tmp_path, capsys):
    """Block 1 without its down projection was exported without it (a stock loader then
    initialises it at random)."""
    folder = _variant(llama[0], tmp_path / "m",
                      tensors=lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    _fails(_shrink(folder, tmp_path / "o", "--mlp", "0.5"), capsys, 1,
           "block 1 has no tensor 'mlp.down_proj.weight', which block 0 has")
    assert not os.path.exists(tmp_path / "o")


def test_shrink_tensor_of_the_wrong_shape(llama, tmp_path, capsys):
    """An up projection of another input width in one block (only its sliced axis was
    checked)."""
    def edit(sd):
        sd["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 7), np.float32)
    folder = _variant(llama[0], tmp_path / "m", tensors=edit)
    _fails(_shrink(folder, tmp_path / "o", "--mlp", "0.5"), capsys, 1,
           "tensor 'mlp.up_proj.weight' of block 1 has dtype F32 and shape [48, 7], but in "
           "block 0 F32 and [48, 32]")


def test_shrink_tensor_of_another_dtype(llama, tmp_path, capsys):
    """An int8 weight in one block passed when only layers were dropped."""
    def edit(sd):
        sd["model.layers.2.self_attn.o_proj.weight"] = \
            sd["model.layers.2.self_attn.o_proj.weight"].astype(np.int8)
    folder = _variant(llama[0], tmp_path / "m", tensors=edit)
    cal = _calibration(tmp_path / "c.safetensors", LLAMA_BLOCKS)
    _fails(_shrink(folder, tmp_path / "o", "--drop-layers", "1", "--calibration", cal),
           capsys, 1, "tensor 'self_attn.o_proj.weight' of block 2 has dtype I8")
    assert not os.path.exists(tmp_path / "o")


def test_shrink_one_expert_missing_a_tensor(mixtral, tmp_path, capsys):
    """Expert 2 of block 0 without its down projection (w2)."""
    folder = _variant(mixtral, tmp_path / "m", tensors=lambda sd: sd.pop(
        "model.layers.0.block_sparse_moe.experts.2.w2.weight"))
    _fails(_shrink(folder, tmp_path / "o", "--mlp", "0.5"), capsys, 1,
           "block 0 has no tensor 'block_sparse_moe.experts.2.w2.weight' (expert 2 of 4)")
    assert not os.path.exists(tmp_path / "o")


# -- fixed: calibration files given to shrink ---------------------------------------------------

def test_shrink_block_statistics_of_blocks_that_do_not_exist(llama, tmp_path, capsys):
    """Block statistics of a deeper model (blocks 0-5 for a 3-block model) were half used."""
    cal = _calibration(tmp_path / "c.safetensors", [f"model.layers.{i}" for i in range(6)])
    _fails(_shrink(llama[0], tmp_path / "o", "--drop-layers", "1", "--calibration", cal),
           capsys, 1, "c.safetensors: block statistics for 'model.layers.3', a block this "
           "model does not have", "for another model")
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]


def test_shrink_reap_file_of_another_model(mixtral, tmp_path, capsys):
    """REAP statistics of an 8-expert model for a 4-expert one."""
    experts = [f"model.layers.{L}.block_sparse_moe.experts.{e}" for L in range(3)
               for e in range(8)]
    cal = _calibration(tmp_path / "c.safetensors", experts=experts)
    _fails(_shrink(mixtral, tmp_path / "o", "--experts", "0.25", "--calibration", cal),
           capsys, 1, "expert statistics for 'model.layers.0.block_sparse_moe.experts.4'",
           "for another model")
    assert not os.path.exists(tmp_path / "o")


def test_shrink_statistics_of_the_wrong_width(llama, tmp_path, capsys):
    """Input statistics of 7 features for a down projection of 48 columns: the error named
    neither the layer nor the file."""
    cal = _calibration(tmp_path / "c.safetensors",
                       layers={"model.layers.0.mlp.down_proj": 7})
    _fails(_shrink(llama[0], tmp_path / "o", "--mlp", "0.5", "--calibration", cal), capsys, 1,
           "c.safetensors: the statistics of layer 'model.layers.0.mlp.down_proj' have 7 input "
           "features, but its weight has 48 columns")
    assert not os.path.exists(tmp_path / "o")


def test_shrink_layer_statistics_of_another_model(llama, tmp_path, capsys):
    """Statistics naming no weight of the model: widths were silently scored by magnitude."""
    cal = _calibration(tmp_path / "c.safetensors",
                       layers={"encoder.layer.0.output.dense": 48})
    _fails(_shrink(llama[0], tmp_path / "o", "--mlp", "0.5", "--calibration", cal), capsys, 1,
           "layer statistics for 'encoder.layer.0.output.dense'", "for another model")


# -- fixed: weights and tokenizer files given to calibrate ----------------------------------------

@pytest.mark.parametrize("dtype", [np.int8, np.bool_])
def test_calibrate_weight_of_an_integer_dtype(llama, tmp_path, capsys, dtype):
    """An int8 or bool weight reached the block's matmul: "the first block fails (expected m1
    and m2 to have the same dtype ...)", naming no tensor."""
    def edit(sd):
        w = sd["model.layers.1.mlp.down_proj.weight"]
        sd["model.layers.1.mlp.down_proj.weight"] = (w > 0) if dtype is np.bool_ \
            else w.astype(np.int8)
    folder = _variant(llama[0], tmp_path / "m", tensors=edit)
    _fails(["calibrate", folder, "--text", llama[1], "-o", str(tmp_path / "c.safetensors")],
           capsys, 1, "tensor 'model.layers.1.mlp.down_proj.weight' is "
           f"{'BOOL' if dtype is np.bool_ else 'I8'}, but the model's parameter")
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_calibrate_tokenizer_file_too_large(llama, tmp_path, capsys):
    """A tokenizer.json past the JSON size bound (sparse here) was parsed whole by the
    tokenizer library (300 MB of it: 1 GB RSS)."""
    from aprender.io.checkpoint import MAX_JSON_BYTES

    folder = _variant(llama[0], tmp_path / "m")
    with open(os.path.join(folder, "tokenizer.json"), "r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    _fails(["calibrate", folder, "--text", llama[1], "-o", str(tmp_path / "c.safetensors")],
           capsys, 1, f"tokenizer.json: {MAX_JSON_BYTES + 1} bytes is too large for a tokenizer "
           "file")
    assert sorted(os.listdir(tmp_path)) == ["m"]


# -- paths: what appears at OUTPUT or --report during a run ----------------------------------------

@pytest.mark.parametrize("target", ["output", "report", "calibration"])
def test_output_appearing_during_the_run_is_never_replaced(llama, tmp_path, target):
    """A folder with a file in it appears at shrink's OUTPUT or --report, or at calibrate's
    -o, while the run is paused before that rename: left untouched, exit 1, one line."""
    from test_attacks_checkpoint import _intruder, _paused_run

    out, rep = tmp_path / "o", tmp_path / "r.json"
    if target == "calibration":
        rep = tmp_path / "c.safetensors"
        args = ["calibrate", llama[0], "--text", llama[1], "-o", rep, "--quiet"]
    else:
        args = _shrink(llama[0], out, "--mlp", "0.5", "--report", rep)
    at = out if target == "output" else rep
    code, err = _paused_run(tmp_path, args, at, lambda: _intruder(at, "folder"))
    assert code == 1, err
    assert "appeared while the run was in progress" in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(at)) == ["precious.txt"]
    left = sorted(os.listdir(tmp_path))
    # the report is written after OUTPUT is committed (as prune writes its own): a complete
    # OUTPUT then stays beside the error, never a temporary folder
    assert left == (["o", "r.json"] if target == "report" else [at.name]), left


@pytest.mark.parametrize("topk", [9, 0, -1, 2.0])
@pytest.mark.parametrize("command", ["shrink", "calibrate"])
def test_experts_per_token_outside_the_experts(mixtral, tmp_path, capsys, topk, command):
    """num_experts_per_tok beyond the 4 experts, 0, negative or a float: calibrate failed
    inside the first block ("selected index k out of range") or, with 0, routed no token and
    wrote statistics; shrink copied the config through."""
    folder = _variant(mixtral, tmp_path / "m", config={"num_experts_per_tok": topk})
    if command == "shrink":
        args = _shrink(folder, tmp_path / "o", "--mlp", "0.5")
    else:
        save_tokenizer(folder)
        (tmp_path / "t.txt").write_text("\n".join(samples(4)) + "\n")
        args = ["calibrate", folder, "--text", str(tmp_path / "t.txt"), "-o",
                str(tmp_path / "c.safetensors")]
    _fails(args, capsys, 1, "num_experts_per_tok must be an integer in [1, 4]",
           f"got {topk!r}")
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "c.safetensors")


def test_calibrate_tensors_of_blocks_beyond_the_config(llama, tmp_path, capsys):
    """A 3-block checkpoint with num_hidden_layers = 2: block 2's tensors were ignored and a
    calibration of the truncated model written without a word."""
    folder = _variant(llama[0], tmp_path / "m", config={"num_hidden_layers": 2})
    _fails(["calibrate", folder, "--text", llama[1], "-o", str(tmp_path / "c.safetensors")],
           capsys, 1, "tensor 'model.layers.2.", "has index 2, beyond what the config builds")
    assert sorted(os.listdir(tmp_path)) == ["m"]
