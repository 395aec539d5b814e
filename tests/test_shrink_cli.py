"""``aprender shrink`` and aprender.shrink.shrink_checkpoint: the plan the criteria choose
(checked against scores computed here from the weights and calibration inputs), least-squares
compensation (each refit projection's error on the calibration inputs below the slice-only
error), the report, and one-line errors with their exit codes."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import shrink_models as sm  # noqa: E402
from aprender.cli import main  # noqa: E402
from aprender.errors import InvalidArgumentError  # noqa: E402
from aprender.pruning import ActivationStats, CalibrationContext  # noqa: E402
from aprender.shrink import shrink_checkpoint  # noqa: E402

sm.families()


def _calibrate(src, path, family="llama"):
    """Statistics of the tiny model on random tokens, collected here with hooks: input norms
    and Hessians of every down/output projection, block influence sums per block.  Returns
    (context, {projection: its inputs X})."""
    _, kind, _ = sm.families()[family]
    model = sm.auto_class(kind).from_pretrained(src).eval()
    ctx, xs, hooks = CalibrationContext(), {}, []
    for name, mod in model.named_modules():
        if name.endswith(("mlp.down_proj", "self_attn.o_proj")):
            st = ActivationStats(mod.in_features, hessian=True)
            ctx.add_layer_stats(name, st)

            def grab(mod, args, name=name, st=st):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
                st.update(x)
                xs.setdefault(name, []).append(x)
            hooks.append(mod.register_forward_pre_hook(grab))
    for i, layer in enumerate(model.model.layers):
        def cos(mod, args, kwargs, out, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            o = out if isinstance(out, torch.Tensor) else out[0]
            c = torch.nn.functional.cosine_similarity(h.double(), o.double(), dim=-1)
            ctx.add_block_stats(f"model.layers.{i}", float(c.sum()), c.numel())
        hooks.append(layer.register_forward_hook(cos, with_kwargs=True))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _ in range(4):
            model(input_ids=torch.randint(3, 64, (2, 16), generator=g), use_cache=False)
    for h in hooks:
        h.remove()
    ctx.num_samples = 8
    ctx.save(path)
    return ctx, {k: np.concatenate(v) for k, v in xs.items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    src = sm.build("llama", str(d / "model"))
    ctx, xs = _calibrate(src, str(d / "calib.safetensors"))
    return src, str(d / "calib.safetensors"), ctx, xs


def _weights(folder):
    from safetensors.numpy import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def _top(scores, k):
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


def test_cli_plan_and_compensation(llama, tmp_path, capsys):
    src, cal, ctx, xs = llama
    out, rep = tmp_path / "out", tmp_path / "r.json"
    rc = main(["shrink", src, "-o", str(out), "--calibration", cal, "--drop-layers", "1",
               "--mlp", "0.5", "--heads", "0.5", "--round-to", "1", "--report", str(rep)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "num_hidden_layers" in printed and "compensated: 4 projections" in printed
    report = json.loads(rep.read_text())
    # layers: the block of least influence 1 - mean cos goes
    bi = [1 - ctx.block_stats[f"model.layers.{i}"].cos_sum
          / ctx.block_stats[f"model.layers.{i}"].tokens for i in range(sm.L)]
    dropped = int(np.argmin(bi))
    assert report["layers_kept"] == [i for i in range(sm.L) if i != dropped]
    orig, new = _weights(src), _weights(str(out))
    for j, i in enumerate(report["layers_kept"]):
        # MLP channels: the top half by ||X_j|| * ||W_down[:, j]||
        name = f"model.layers.{i}.mlp.down_proj"
        w = orig[name + ".weight"].astype(np.float64)
        x = xs[name]
        score = np.sqrt((x * x).sum(0)) * np.linalg.norm(w, axis=0)
        kept = _top(score, sm.I // 2)
        assert report["mlp_channels"][str(i)] == kept
        # compensation: below the slice-only error on the calibration inputs
        w2 = new[f"model.layers.{j}.mlp.down_proj.weight"].astype(np.float64)
        dense = x @ w.T
        e_slice = np.linalg.norm(x[:, kept] @ w[:, kept].T - dense)
        e_comp = np.linalg.norm(x[:, kept] @ w2.T - dense)
        assert e_comp < 0.9 * e_slice
        # heads: the KV group whose query heads' columns score higher stays
        name = f"model.layers.{i}.self_attn.o_proj"
        w, x = orig[name + ".weight"].astype(np.float64), xs[name]
        col = np.sqrt((x * x).sum(0)) * np.linalg.norm(w, axis=0)
        g = col.reshape(sm.KV, -1).sum(1)
        assert report["kv_heads"][str(i)] == _top(g, 1)
        cols = np.arange(col.size).reshape(sm.KV, -1)[_top(g, 1)].reshape(-1)
        w2 = new[f"model.layers.{j}.self_attn.o_proj.weight"].astype(np.float64)
        dense = x @ w.T
        assert np.linalg.norm(x[:, cols] @ w2.T - dense) < \
            np.linalg.norm(x[:, cols] @ w[:, cols].T - dense)
    assert report["compensated"] is True and len(report["compensated_tensors"]) == 4
    assert "activation-aware" in report["criteria"]["mlp"]
    assert "block influence" in report["criteria"]["layers"]
    assert report["parameters_after"] < report["parameters_before"]
    assert report["bytes_after"] == sum(v.nbytes for v in new.values())


def test_no_compensate_slices_and_loads(llama, tmp_path):
    src, cal, _, _ = llama
    rep = shrink_checkpoint(src, tmp_path / "o", calibration=cal, mlp=0.5, round_to=1,
                            compensate=False)
    assert rep["compensated"] is False and rep["not_compensated_because"] == "--no-compensate"
    orig, new = _weights(src), _weights(str(tmp_path / "o"))
    for i in range(sm.L):
        k = rep["mlp_channels"][str(i)]
        n = f"model.layers.{i}.mlp.down_proj.weight"
        assert np.array_equal(new[n], orig[n][:, k])
    sm.load_export("llama", str(tmp_path / "o"))


def test_magnitude_only_said_and_round_to(llama, tmp_path):
    src = llama[0]
    rep = shrink_checkpoint(src, tmp_path / "o", mlp=0.5, round_to=16)
    assert rep["criteria"]["mlp"].startswith("magnitude only")
    assert rep["not_compensated_because"] == "no --calibration"
    # 48 - 24 = 24 kept, rounded up to a multiple of 16: 32
    assert {len(v) for v in rep["mlp_channels"].values()} == {32}
    w = _weights(src)["model.layers.0.mlp.down_proj.weight"]
    assert rep["mlp_channels"]["0"] == _top(np.linalg.norm(w.astype(np.float64), axis=0), 32)
    assert json.load(open(tmp_path / "o" / "config.json"))["intermediate_size"] == 32
    assert rep["warnings"] == []


def test_a_round_to_that_takes_everything_back_warns(llama, tmp_path, capsys):
    """--mlp 0.25 of 48 channels keeps 36, rounded up to 64 and capped: all 48 stay.  The run
    says so instead of writing an unchanged MLP in silence."""
    assert main(["shrink", str(llama[0]), "-o", str(tmp_path / "o"), "--mlp", "0.25",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "--round-to 64 keeps all 48 channels, so none is removed" in err
    assert json.load(open(tmp_path / "o" / "config.json"))["intermediate_size"] == 48


def test_experts_by_reap(tmp_path):
    src = sm.build("mixtral", str(tmp_path / "model"))
    ctx = CalibrationContext(num_samples=1)
    low = {i: (i + 1) % 4 for i in range(sm.L)}
    for i in range(sm.L):
        for e in range(4):
            ctx.add_expert_stats(f"model.layers.{i}.block_sparse_moe.experts.{e}", 10,
                                 1.0 if e == low[i] else 5.0 + e)
    cal = str(tmp_path / "c.safetensors")
    ctx.save(cal)
    rep = shrink_checkpoint(src, tmp_path / "o", calibration=cal, experts=0.25)
    assert rep["experts"] == {str(i): [e for e in range(4) if e != low[i]] for i in range(sm.L)}
    assert rep["criteria"]["experts"].startswith("REAP")
    assert json.load(open(tmp_path / "o" / "config.json"))["num_local_experts"] == 3
    ids = sm.input_ids()
    want = sm.reference_outputs("mixtral", src, {"experts": {int(k): v for k, v in
                                                              rep["experts"].items()}},
                                ids, str(tmp_path))
    got = sm._run(sm.load_export("mixtral", str(tmp_path / "o")), "causal", ids)
    sm.assert_same(got, want)
    # MLP channels of an MoE layer: one choice for every expert, scored over the kept ones
    rep = shrink_checkpoint(src, tmp_path / "m", calibration=cal, experts=0.25, mlp=0.5,
                            round_to=1)
    w = _weights(src)
    for i in range(sm.L):
        score = sum(np.linalg.norm(w[f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"]
                                   .astype(np.float64), axis=0) for e in rep["experts"][str(i)])
        assert rep["mlp_channels"][str(i)] == _top(score, sm.I // 2)
    sm.compare("mixtral", src, str(tmp_path / "m"),
               {"experts": {int(k): v for k, v in rep["experts"].items()},
                "mlp_channels": {int(k): v for k, v in rep["mlp_channels"].items()}},
               str(tmp_path / "cmp"))
    with pytest.raises(InvalidArgumentError, match="num_experts_per_tok is 2 but the plan keeps 1"):
        shrink_checkpoint(src, tmp_path / "p", calibration=cal, experts=0.75)
    assert not os.path.exists(tmp_path / "p")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return sm.build("bert", str(tmp_path_factory.mktemp("bert") / "model"))


@pytest.mark.parametrize("args,code,message", [
    (["--heads", "0.5"], 1, "bert: attention heads cannot be removed: BERT derives"),
    (["--drop-layers", "1"], 1, "dropping layers needs a calibration file (--calibration"),
    (["--drop-layers", "3", "--calibration", "CAL"], 1, "at least one must stay"),
    (["--mlp", "1"], 2, "--mlp must be a fraction in [0, 1)"),
    (["--mlp", "1.5"], 2, "expected a fraction in [0, 1]"),
    ([], 2, "nothing to remove: give --drop-layers, --mlp, --heads or --experts"),
    (["--experts", "0.5"], 1, "bert: the family has no routed experts"),
])
def test_cli_errors(args, code, message, bert, llama, tmp_path, capsys):
    model = llama[0] if "CAL" in args else bert
    args = [llama[1] if a == "CAL" else a for a in args]
    try:
        rc = main(["shrink", model, "-o", str(tmp_path / "o")] + args)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code
    assert message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_cli_paths(llama, tmp_path, capsys):
    src = llama[0]
    assert main(["shrink", src, "-o", os.path.join(src, "o"), "--mlp", "0.5"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    assert main(["shrink", src, "-o", str(tmp_path / "o"), "--mlp", "0.5"]) == 1
    assert "already exists (use --force" in capsys.readouterr().err
    assert main(["shrink", src, "-o", str(tmp_path / "o"), "--mlp", "0.5", "--force",
                 "--quiet", "--round-to", "1"]) == 0
    assert capsys.readouterr().out == ""
    assert json.load(open(tmp_path / "o" / "config.json"))["intermediate_size"] == 24


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_mid_write_leaves_nothing(llama, tmp_path, sig, code):
    """The writer pauses after its first shard (test-only switch, as for prune): a signal then
    leaves no output and no temporary folder."""
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               APRENDER_TEST_PAUSE_AFTER_SHARD="1")
    p = subprocess.Popen([sys.executable, "-m", "aprender", "shrink", llama[0], "-o",
                          str(tmp_path / "out"), "--mlp", "0.5", "--quiet"], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # blocks until the writer has paused after its first shard
    assert line.strip() == "aprender-test: paused", line
    assert any(n.endswith(".aprender-tmp") for n in os.listdir(tmp_path))
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert os.listdir(tmp_path) == []


def test_bfloat16_scores_read_in_place(tmp_path):
    """bfloat16 weights are scored from the mapped words (decoded a block of rows at a time):
    the same channels as from the float32 values."""
    model = sm.transformers.AutoModelForCausalLM.from_pretrained(
        sm.build("llama", str(tmp_path / "f32"))).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    rep = shrink_checkpoint(tmp_path / "bf16", tmp_path / "o", mlp=0.25, round_to=1)
    for i in range(sm.L):
        w = model.model.layers[i].mlp.down_proj.weight.detach().double().numpy()
        assert rep["mlp_channels"][str(i)] == _top(np.linalg.norm(w, axis=0), 36)
