"""`aprender calibrate` on tiny Hugging Face checkpoints built here from config classes (no
download): statistics named as the checkpoint's weights whatever class loads the model, equal
to the statistics collected on the model itself."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from aprender.cli import main  # noqa: E402
from aprender.hf import checkpoint_names  # noqa: E402
from aprender.io import SafetensorsFile  # noqa: E402
from aprender.pruning import CalibrationContext  # noqa: E402
from aprender.torch import collect_calibration  # noqa: E402

WORDS = ("the a model prunes weights layer sparse dense calibration text sample token input "
         "output value mask row column matrix vector").split()


def _tokenizer(folder):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]",
                                                pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]")
    fast.save_pretrained(folder)
    return len(vocab)


def tiny_llama(folder):
    """A LlamaForCausalLM checkpoint: its files say model.layers.N..., while AutoModel's
    modules are layers.N... (the prefix is dropped)."""
    torch.manual_seed(0)
    vocab = _tokenizer(folder)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def text_file(path, n=12):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 14))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n\n")
    return lines


def test_calibrate_names_statistics_as_the_checkpoint(tmp_path, capsys):
    folder = tmp_path / "llama"
    model = tiny_llama(folder)
    lines = text_file(tmp_path / "calib.txt")
    out = tmp_path / "calib.safetensors"
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "calib.txt"), "-o", str(out),
                 "--batch-size", "5", "--quiet"]) == 0
    ctx = CalibrationContext.load(out)
    files = {t.name for t in SafetensorsFile(folder / "model.safetensors")}
    assert "model.layers.0.self_attn.q_proj" in ctx.layer_names
    assert all(n + ".weight" in files for n in ctx.layer_names)
    assert ctx.num_samples == len(lines)
    # the same statistics collected on the causal-LM model, whose module names are the files'
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batches = [dict(tok(lines[i:i + 5], padding=True, return_tensors="pt"))
               for i in range(0, len(lines), 5)]
    ref = collect_calibration(model.model, batches, progress=False)
    for name in ref.layer_names:
        got = ctx.require_stats("model." + name)
        want = ref.get_stats(name)
        assert got.count == want.count
        np.testing.assert_allclose(got.sum_squares, want.sum_squares, rtol=1e-6)


def test_checkpoint_names_prefixes_and_wrappers():
    files = {"model.layers.0.q.weight": (4, 4), "model.layers.0.k.weight": (2, 4),
             "encoder.layer.0.dense.weight": (8, 4), "lm_head.weight": (9, 4)}
    modules = {"layers.0.q": (4, 4), "model.layers.0.k": (2, 4),
               "0.model.encoder.layer.0.dense": (8, 4), "lm_head": (9, 5), "other": (3, 3)}
    assert checkpoint_names(modules, files) == {
        "layers.0.q": "model.layers.0.q", "model.layers.0.k": "model.layers.0.k",
        "0.model.encoder.layer.0.dense": "encoder.layer.0.dense"}


def test_calibrate_errors(tmp_path, capsys):
    folder = tmp_path / "llama"
    tiny_llama(folder)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "empty.txt"), "-o",
                 str(tmp_path / "c.safetensors")]) == 1
    assert "no calibration text" in capsys.readouterr().err
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "empty.txt"), "-o",
                 str(folder / "config.json"), "--force"]) == 2
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "t.txt").write_text("the model\n")
    assert main(["calibrate", str(tmp_path / "notamodel"), "--text", str(tmp_path / "t.txt"),
                 "-o", str(tmp_path / "c.safetensors")]) == 1
    assert not os.path.exists(tmp_path / "c.safetensors")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_calibrate_hessian_then_prune_sparsegpt_a_llama_checkpoint(tmp_path):
    """The whole SparseGPT path on a real transformers checkpoint: calibrate --hessian shares one
    Hessian between q/k/v and between gate/up, and prune --importance sparsegpt streams it."""
    import json
    import struct

    folder = tmp_path / "llama"
    tiny_llama(folder)
    text_file(tmp_path / "calib.txt", n=24)
    calib = tmp_path / "calib.safetensors"
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "calib.txt"), "-o",
                 str(calib), "--hessian", "--quiet"]) == 0
    with open(calib, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    shared = json.loads(header["__metadata__"]["hessian_of"])
    for i in range(2):
        p = f"model.layers.{i}."
        assert shared[p + "self_attn.k_proj"] == shared[p + "self_attn.v_proj"] == \
            p + "self_attn.q_proj"
        assert shared[p + "mlp.up_proj"] == p + "mlp.gate_proj"
        assert p + "self_attn.o_proj" not in shared and p + "mlp.down_proj" not in shared
        assert header[p + "self_attn.q_proj.hessian"]["dtype"] == "F32"
    out = tmp_path / "pruned"
    assert main(["prune", str(folder), "-o", str(out), "--importance", "sparsegpt",
                 "--calibration", str(calib), "--pattern", "2:4", "--quiet"]) == 0
    before = SafetensorsFile(folder / "model.safetensors")
    after = SafetensorsFile(out / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    w0, w1 = np.array(before.array(name)), np.array(after.array(name))
    kept = w1 != 0
    assert (kept.reshape(w1.shape[0], -1, 4).sum(-1) <= 2).all()
    assert not np.array_equal(w0[kept], w1[kept])  # the kept weights were updated
