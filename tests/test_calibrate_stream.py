"""The block executor behind `aprender calibrate` (aprender.models.executor), on tiny checkpoints
of every family `shrink` targets, built here from transformers' config classes with random
weights (nothing downloaded): the statistics streamed block by block from the memory-mapped
checkpoint equal those of hooks on the whole model loaded in float32 by transformers; block
influence equals cos(h_in, h_out) computed from the whole model's hidden states; each MoE
expert's statistics cover exactly its routed tokens, computed here from the checkpoint's own
per-expert tensors.  Then the hostile model folders of issue #22."""
import json
import os
import pickle
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from aprender.cli import main  # noqa: E402
from aprender.errors import CalibrationError  # noqa: E402
from aprender.hf import checkpoint_names, read_text_samples  # noqa: E402
from aprender.io import SafetensorsFile  # noqa: E402
from aprender.io.safetensors import write_safetensors  # noqa: E402
from aprender.models import executor  # noqa: E402
from aprender.models.executor import BlockExecutor, calibrate_folder  # noqa: E402
from aprender.pruning import CalibrationContext  # noqa: E402
from aprender.torch import collect_calibration  # noqa: E402

WORDS = ("the a model prunes weights layer sparse dense calibration text sample token input "
         "output value mask row column matrix vector").split()
MOE_OK = int(transformers.__version__.split(".")[0]) >= 5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_tokenizer(folder, specials=True):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3} if specials else {}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]" if specials else None)
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    kw = dict(unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]") \
        if specials else {}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **kw).save_pretrained(folder)
    return len(vocab)


COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               {"head_dim": 8, "sliding_window": 4, "tie_word_embeddings": True,
                "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                   "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "bert": (transformers.BertConfig, transformers.BertForMaskedLM,
             {"num_key_value_heads": None, "tie_word_embeddings": True}),
}


def tiny(folder, family, specials=True, **override):
    """A tiny checkpoint of ``family`` saved with save_pretrained (safetensors)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    vocab = save_tokenizer(folder, specials)
    kw = dict(COMMON, vocab_size=vocab, **extra)
    kw = {k: v for k, v in kw.items() if v is not None}
    if specials:
        kw["pad_token_id"] = 0
    kw.update(override)
    model = model_cls(config_cls(**kw))
    with torch.no_grad():  # make norms and biases non-trivial
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def samples(n=11, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 15))) for _ in range(n)]


def checkpoint_keys(folder):
    return {t.name for t in SafetensorsFile(os.path.join(folder, "model.safetensors"))}


def moe_or_refused(tmp_path, family="mixtral"):
    """True when this transformers calibrates mixture-of-experts models (5 and later); with
    transformers 4, checks that they are refused (their experts' inputs would count padding)."""
    if MOE_OK:
        return True
    tiny(tmp_path / "refused", family)
    with pytest.raises(CalibrationError, match="transformers >= 5"):
        calibrate_folder(tmp_path / "refused", ["the model"])
    return False


def reference(folder, lines, batch_size, hessian=False):
    """Statistics of the whole model loaded in float32 by transformers: Linear inputs by
    collect_calibration, router inputs and per-expert statistics by hooks and the checkpoint's
    own per-expert tensors, block cos from output_hidden_states."""
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batches = [dict(tok(lines[i:i + batch_size], padding=True, return_tensors="pt"))
               for i in range(0, len(lines), batch_size)]
    keys = checkpoint_keys(folder)
    ctx = collect_calibration(model, batches, progress=False, hessian=hessian,
                              layers=lambda n, m: n + ".weight" in keys)
    stats = {n: ctx.get_stats(n) for n in ctx.layer_names}
    sf = SafetensorsFile(os.path.join(folder, "model.safetensors"))

    def w(name):
        return torch.from_numpy(np.array(sf.array(name)))

    # MoE: router inputs and routing from hooks; expert maths from the per-expert tensors
    experts, moe = {}, []
    for lname, layer in model.named_modules():
        gate = getattr(layer, "gate", None)
        if gate is not None and hasattr(layer, "experts") and hasattr(gate, "top_k"):
            moe.append((lname, layer))
    from aprender.pruning import ActivationStats
    cos = {}
    for b in batches:
        mask = b["attention_mask"].bool()
        seen = {}
        handles = []
        for lname, layer in moe:
            def pre(_m, args, lname=lname):
                seen[lname] = args[0].reshape(-1, args[0].shape[-1])

            def post(_m, args, out, lname=lname):
                seen[lname + "/route"] = out
            handles += [layer.gate.register_forward_pre_hook(pre),
                        layer.gate.register_forward_hook(post)]
        with torch.no_grad():
            out = model(**b, output_hidden_states=True)
        for h in handles:
            h.remove()
        hs = out.hidden_states
        base = "bert.encoder.layer" if cfg["model_type"] == "bert" else "model.layers"
        for k in range(len(hs) - 1):
            c = torch.nn.functional.cosine_similarity(hs[k].double(), hs[k + 1].double(),
                                                      dim=-1)
            s, t = cos.get(f"{base}.{k}", (0.0, 0))
            cos[f"{base}.{k}"] = (s + float(c[mask].sum()), t + int(mask.sum()))
        real = mask.reshape(-1)
        for lname, layer in moe:
            x = seen[lname]
            _, scores, index = seen[lname + "/route"]
            ck = lname.replace(".mlp", ".block_sparse_moe") \
                if cfg["model_type"] == "mixtral" else lname
            rname = ck + ".gate"
            stats.setdefault(rname, ActivationStats(x.shape[-1], hessian=hessian)).update(
                x[real].numpy())
            names = ("w1", "w3", "w2") if cfg["model_type"] == "mixtral" else \
                ("gate_proj", "up_proj", "down_proj")
            for e in range(layer.gate.weight.shape[0]):
                tok_, pos = torch.where((index == e) & real[:, None])
                if not len(tok_):
                    continue
                p = f"{ck}.experts.{e}"
                xe = x[tok_]
                act = torch.nn.functional.silu(xe @ w(f"{p}.{names[0]}.weight").T) * \
                    (xe @ w(f"{p}.{names[1]}.weight").T)
                y = act @ w(f"{p}.{names[2]}.weight").T
                for nm, inp in ((names[0], xe), (names[1], xe), (names[2], act)):
                    stats.setdefault(f"{p}.{nm}", ActivationStats(
                        inp.shape[-1], hessian=hessian)).update(
                        inp.numpy())
                t, r = experts.get(p, (0, 0.0))
                experts[p] = (t + len(tok_), r + float((scores[tok_, pos].double()
                                                         * y.double().norm(dim=-1)).sum()))
    if cfg["model_type"] != "bert":
        # output_hidden_states' last entry is after the final norm: the last block by hook
        last = len(hs) - 2
        cos[f"{base}.{last}"] = _last_block_cos(model, batches, last)
    return stats, cos, experts


def _last_block_cos(model, batches, last):
    layer = model.model.layers[last]
    got = []
    h = layer.register_forward_hook(lambda m, args, kwargs, out: got.append(
        (kwargs.get("hidden_states", args[0] if args else None), out)), with_kwargs=True)
    total, tokens = 0.0, 0
    try:
        for b in batches:
            got.clear()
            with torch.no_grad():
                model(**b)
            hin, hout = got[0]
            hout = hout[0] if isinstance(hout, tuple) else hout
            c = torch.nn.functional.cosine_similarity(hin.double(), hout.double(), dim=-1)
            m = b["attention_mask"].bool()
            total += float(c[m].sum())
            tokens += int(m.sum())
    finally:
        h.remove()
    return total, tokens


def assert_same(ctx, stats, cos, experts):
    assert set(ctx.layer_names) == set(stats), set(ctx.layer_names) ^ set(stats)
    for name, want in stats.items():
        got = ctx.require_stats(name)
        assert got.count == want.count, name
        np.testing.assert_allclose(got.sum_squares, want.sum_squares, rtol=2e-5, atol=1e-6,
                                   err_msg=name)
    blocks = ctx.block_stats
    assert set(blocks) == set(cos)
    for name, (s, t) in cos.items():
        assert blocks[name].tokens == t
        assert blocks[name].cos_sum == pytest.approx(s, rel=1e-5)
    got = ctx.expert_stats
    assert set(got) == set(experts)
    for name, (t, r) in experts.items():
        assert got[name].tokens == t
        assert got[name].reap_sum == pytest.approx(r, rel=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_statistics_equal_the_whole_model(tmp_path, family):
    if family in ("mixtral", "qwen3_moe") and not moe_or_refused(tmp_path, family):
        return
    folder = tmp_path / family
    tiny(folder, family)
    lines = samples()
    ctx, _ = calibrate_folder(folder, lines, batch_size=4)
    stats, cos, experts = reference(folder, lines, 4)
    keys = checkpoint_keys(folder)
    assert all(n + ".weight" in keys for n in ctx.layer_names)
    if family in ("mixtral", "qwen3_moe"):
        assert len(experts) == 2 * 4  # every expert of both layers got tokens
        assert any(".experts.3." in n for n in ctx.layer_names)
    assert ctx.num_samples == len(lines)
    assert_same(ctx, stats, cos, experts)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_streamed_hessians_equal_the_whole_model(tmp_path, family):
    if family == "mixtral" and not moe_or_refused(tmp_path):
        return
    folder = tmp_path / family
    tiny(folder, family)
    lines = samples()
    ctx, _ = calibrate_folder(folder, lines, batch_size=4, hessian=True)
    stats, _, _ = reference(folder, lines, 4, hessian=True)
    assert set(ctx.layer_names) == set(stats)
    for name, want in stats.items():
        got = ctx.require_stats(name)
        assert got.has_hessian and want.has_hessian
        np.testing.assert_allclose(got.hessian, want.hessian, rtol=2e-5, atol=1e-5,
                                   err_msg=name)
    p = "model.layers.1.block_sparse_moe.experts.2." if family == "mixtral" else \
        "model.layers.1.mlp."
    up, gate = ("w3", "w1") if family == "mixtral" else ("up_proj", "gate_proj")
    assert ctx.require_stats(p + up).shares_hessian_with(ctx.require_stats(p + gate))


def test_padding_excluded_batches_of_different_lengths(tmp_path):
    """Samples padded into one batch give the statistics of each sample run alone."""
    if not moe_or_refused(tmp_path, "qwen3_moe"):
        return
    folder = tmp_path / "m"
    tiny(folder, "qwen3_moe")
    lines = samples(6, seed=3)
    assert len({len(s.split()) for s in lines}) > 1
    together, _ = calibrate_folder(folder, lines, batch_size=6)
    alone, _ = calibrate_folder(folder, lines, batch_size=1)
    assert together.layer_names and sorted(together.layer_names) == sorted(alone.layer_names)
    for n in together.layer_names:
        a, b = together.require_stats(n), alone.require_stats(n)
        assert a.count == b.count
        np.testing.assert_allclose(a.sum_squares, b.sum_squares, rtol=1e-5, atol=1e-6)
    for n, st in together.block_stats.items():
        assert st.tokens == alone.block_stats[n].tokens == sum(len(s.split()) for s in lines)
        assert st.cos_sum == pytest.approx(alone.block_stats[n].cos_sum, rel=1e-6)
    for n, st in together.expert_stats.items():
        assert st.tokens == alone.expert_stats[n].tokens
        assert st.reap_sum == pytest.approx(alone.expert_stats[n].reap_sum, rel=1e-5)


def test_scratch_file_gives_the_same_statistics_and_leaves_nothing(tmp_path):
    folder = tmp_path / "m"
    tiny(folder, "llama")
    lines = samples()
    out = tmp_path / "out" / "calib.safetensors"
    out.parent.mkdir()
    in_memory, _ = calibrate_folder(folder, lines, batch_size=4)
    ex = BlockExecutor(folder, memory_budget=0, scratch_near=str(out))
    tok = executor.load_tokenizer(folder)
    on_disk, _ = ex.calibrate(executor.tokenize(tok, lines, max_length=64, batch_size=4))
    assert ex.scratch_used
    assert on_disk == in_memory
    assert os.listdir(out.parent) == []


def test_scratch_file_removed_on_error(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    tiny(folder, "mistral")
    out = tmp_path / "out" / "calib.safetensors"
    out.parent.mkdir()
    created = []
    real_temp = executor.temp_name

    def spy(target, kind):
        created.append(real_temp(target, kind))
        return created[-1]
    run_block = BlockExecutor._run_block

    def fail_second(self, k, *args):
        assert os.listdir(out.parent) == []  # unlinked as soon as it was created
        if k == 1:
            raise CalibrationError("stop in block 1")
        return run_block(self, k, *args)
    monkeypatch.setattr(executor, "temp_name", spy)
    monkeypatch.setattr(BlockExecutor, "_run_block", fail_second)
    with pytest.raises(CalibrationError, match="stop in block 1"):
        calibrate_folder(folder, samples(), batch_size=4, memory_budget=0,
                         scratch_near=str(out))
    assert len(created) == 1 and os.path.dirname(created[0]) == str(out.parent)
    assert os.listdir(out.parent) == []


def test_bfloat16_compute(tmp_path):
    if not moe_or_refused(tmp_path, "mixtral"):
        return
    folder = tmp_path / "m"
    tiny(folder, "mixtral")
    lines = samples()
    f32, _ = calibrate_folder(folder, lines, batch_size=4)
    bf16, _ = calibrate_folder(folder, lines, batch_size=4, dtype="bfloat16", memory_budget=0)
    assert sorted(f32.layer_names) == sorted(bf16.layer_names) or \
        set(bf16.layer_names) <= set(f32.layer_names)
    n = "model.layers.0.self_attn.q_proj"
    assert bf16.require_stats(n).count == f32.require_stats(n).count
    np.testing.assert_allclose(bf16.require_stats(n).sum_squares,
                               f32.require_stats(n).sum_squares, rtol=0.05)


def test_cli_calibrate_then_prune_wanda_a_mixtral(tmp_path):
    """Issue #21: a Mixtral's calibration file now names every expert's projections, so
    prune --importance wanda finds them."""
    if not moe_or_refused(tmp_path, "mixtral"):
        return
    folder = tmp_path / "mix"
    tiny(folder, "mixtral")
    (tmp_path / "t.txt").write_text("\n".join(samples(16)) + "\n")
    calib = tmp_path / "c.safetensors"
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "t.txt"), "-o", str(calib),
                 "--quiet", "--memory-budget", "1K"]) == 0
    ctx = CalibrationContext.load(calib)
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in ctx.layer_names
    assert "model.layers.0.block_sparse_moe.gate" in ctx.layer_names
    assert "model.layers.1.block_sparse_moe.experts.3" in ctx.expert_stats
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "mix", "t.txt"]
    assert main(["prune", str(folder), "-o", str(tmp_path / "pruned"), "--importance", "wanda",
                 "--calibration", str(calib), "--sparsity", "0.5", "--quiet"]) == 0


def test_bert_masked_lm_without_pooler(tmp_path):
    """Issue #21's naming bug: a BertForMaskedLM checkpoint has no pooler; its modules are
    named as the checkpoint names them and nothing is matched by a last component alone."""
    folder = tmp_path / "bert"
    tiny(folder, "bert")
    keys = checkpoint_keys(folder)
    assert not any(k.startswith("bert.pooler") for k in keys)
    ctx, left_out = calibrate_folder(folder, samples(), batch_size=4)
    assert "cls.predictions.transform.dense" in ctx.layer_names
    assert "bert.encoder.layer.1.output.dense" in ctx.layer_names
    assert "bert.encoder.layer.1" in ctx.block_stats
    assert "cls.predictions.decoder" in left_out  # tied to the word embeddings
    # checkpoint_names: an absent pooler.dense matches nothing (it used to be an error)
    shapes = {k[:-len(".weight")]: (32, 32) for k in keys if k.endswith("dense.weight")}
    modules = {"pooler.dense": (32, 32), "encoder.layer.0.attention.output.dense": (32, 32)}
    files = {k + ".weight": s for k, s in shapes.items()}
    assert checkpoint_names(modules, files) == {
        "encoder.layer.0.attention.output.dense": "bert.encoder.layer.0.attention.output.dense"}


# -- hostile folders (issue #22) ----------------------------------------------------------------
def _cli(args, env_extra=None, stdin=b"y\ny\ny\n", timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "aprender", *args], input=stdin,
                          capture_output=True, timeout=timeout, env=env)


MARKER_CODE = "open({marker!r}, 'w').write('ran')\n"


def test_auto_map_folder_never_runs_its_code_nor_prompts(tmp_path):
    folder = tmp_path / "remote"
    tiny(folder, "llama")
    marker = tmp_path / "ran-code"
    for mod in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / mod).write_text(MARKER_CODE.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "t.txt").write_text("the model\n")
    modules = tmp_path / "hf-modules"
    r = _cli(["calibrate", str(folder), "--text", str(tmp_path / "t.txt"), "-o",
              str(tmp_path / "c.safetensors")],
             {"HF_MODULES_CACHE": str(modules), "HF_HOME": str(tmp_path / "hf")})
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and "auto_map" in err and "never runs code" in err
    assert "[y/N]" not in err + r.stdout.decode()
    assert not marker.exists()
    assert not modules.exists() or not any(modules.rglob("*.py"))
    assert not (tmp_path / "c.safetensors").exists()
    # an auto_map in the tokenizer's config is refused the same way
    cfg.pop("auto_map")
    (folder / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(CalibrationError, match="auto_map"):
        calibrate_folder(folder, ["the model"])
    assert not marker.exists()


def test_unknown_model_type_is_one_line(tmp_path, capsys):
    folder = tmp_path / "m"
    tiny(folder, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil\x1b[31m"
    (folder / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "t.txt").write_text("the model\n")
    capsys.readouterr()
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "t.txt"), "-o",
                 str(tmp_path / "c.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a family" in err and "\x1b" not in err


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_beside_the_safetensors_is_never_opened(tmp_path):
    folder = tmp_path / "m"
    tiny(folder, "qwen2")
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Marker(str(marker))}, f)
    with open(tmp_path / "probe.pkl", "wb") as f:  # the payload works when unpickled
        pickle.dump(_Marker(str(tmp_path / "probe")), f)
    with open(tmp_path / "probe.pkl", "rb") as f:
        pickle.load(f).close()
    assert (tmp_path / "probe").exists()
    ctx, _ = calibrate_folder(folder, samples(4))
    assert ctx.layer_names
    assert not marker.exists()


def _rewrite(folder, drop=None, change=None):
    sf = SafetensorsFile(folder / "model.safetensors")
    tensors = {}
    for t in sf:
        if t.name == drop:
            continue
        a = np.array(sf.array(t.name))
        tensors[t.name] = change(t.name, a) if change else a
    os.unlink(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", tensors)


@pytest.mark.parametrize("case", ["vocab", "heads", "missing", "shape"])
def test_config_inconsistent_with_the_weights_is_one_line(tmp_path, capsys, case):
    folder = tmp_path / "m"
    tiny(folder, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    want = {"vocab": "model.embed_tokens.weight", "heads": "num_attention_heads",
            "missing": "model.layers.1.mlp.up_proj.weight",
            "shape": "model.layers.0.self_attn.k_proj.weight"}[case]
    if case == "vocab":
        cfg["vocab_size"] = 5
    elif case == "heads":
        cfg["num_attention_heads"] = 0
    (folder / "config.json").write_text(json.dumps(cfg))
    if case == "missing":
        _rewrite(folder, drop=want)
    elif case == "shape":
        _rewrite(folder, change=lambda n, a: a[:8] if n == want else a)
    (tmp_path / "t.txt").write_text("the model\n")
    capsys.readouterr()
    rc = main(["calibrate", str(folder), "--text", str(tmp_path / "t.txt"), "-o",
               str(tmp_path / "c.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    if case != "heads":
        assert want in err
    assert not (tmp_path / "c.safetensors").exists()


def test_max_length_default_and_bound(tmp_path, capsys):
    folder = tmp_path / "m"
    tiny(folder, "llama", max_position_embeddings=8)
    long_line = " ".join(WORDS * 3)
    ctx, _ = calibrate_folder(folder, [long_line, "the model"])
    assert ctx.require_stats("model.layers.0.self_attn.q_proj").count == 8 + 2
    (tmp_path / "t.txt").write_text(long_line + "\n")
    capsys.readouterr()
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "t.txt"), "-o",
                 str(tmp_path / "c.safetensors"), "--max-length", "9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_position_embeddings (8)" in err


def test_tokenizer_without_special_tokens(tmp_path):
    folder = tmp_path / "m"
    tiny(folder, "mistral", specials=False)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token is None and tok.eos_token is None and tok.unk_token is None
    lines = samples(5)
    ctx, _ = calibrate_folder(folder, lines, batch_size=5)  # padded with id 0, masked
    alone, _ = calibrate_folder(folder, lines, batch_size=1)
    n = "model.layers.1.mlp.down_proj"
    assert ctx.require_stats(n).count == sum(len(s.split()) for s in lines)
    np.testing.assert_allclose(ctx.require_stats(n).sum_squares,
                               alone.require_stats(n).sum_squares, rtol=1e-5)


def test_a_64_mib_line_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "t.txt"
    with open(path, "wb") as f:
        f.write(b"the model\n")
        f.write(b"a" * (64 << 20))
        f.write(b"\nlast\n")
    tracemalloc.start()
    try:
        with pytest.raises(CalibrationError, match="a line longer than"):
            read_text_samples(path, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert read_text_samples(path, 1) == ["the model"]


def test_memory_budget_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(tmp_path), "--text", "t", "-o", "o", "--memory-budget", "lots"])
    assert e.value.code == 2
    assert executor.parse_size("1.5G") == 3 << 29 and executor.parse_size("512K") == 512 << 10


def test_an_expert_no_token_reaches(tmp_path):
    """REAP statistics with 0 tokens, no layer statistics, and the file reads back."""
    if not moe_or_refused(tmp_path, "mixtral"):
        return
    folder = tmp_path / "m"
    tiny(folder, "mixtral", num_local_experts=8)
    ctx, _ = calibrate_folder(folder, ["the model"])
    experts = ctx.expert_stats
    assert len(experts) == 2 * 8
    idle = [n for n, s in experts.items() if s.tokens == 0]
    busy = [n for n, s in experts.items() if s.tokens]
    assert idle and busy
    assert all(experts[n].reap_sum == 0 for n in idle)
    assert all(experts[n].reap_sum > 0 for n in busy)
    # every real token goes to two experts, in each layer
    batch = executor.tokenize(executor.load_tokenizer(folder), ["the model"], max_length=64,
                              batch_size=1)[0]
    assert sum(experts[n].tokens for n in busy if ".layers.0." in n) == \
        2 * int(batch["attention_mask"].sum())
    assert not any(n.startswith(idle[0] + ".") for n in ctx.layer_names)
    assert any(n.startswith(busy[0] + ".") for n in ctx.layer_names)
    ctx.save(tmp_path / "c.safetensors")
    assert CalibrationContext.load(tmp_path / "c.safetensors") == ctx


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_mid_run_leaves_nothing(tmp_path, sig, code):
    """Interrupted after its first block (a test-only pause, no timing), with the hidden states
    in the scratch file: exit 130/143, no output, no scratch file, the inputs untouched."""
    import signal

    folder = tmp_path / "m"
    tiny(folder, "llama")
    (tmp_path / "t.txt").write_text("\n".join(samples()) + "\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sorted(os.listdir(folder))
    env = dict(os.environ, PYTHONPATH=REPO, APRENDER_TEST_PAUSE_AFTER_BLOCK="1")
    p = subprocess.Popen([sys.executable, "-m", "aprender", "calibrate", str(folder), "--text",
                          str(tmp_path / "t.txt"), "-o", str(out_dir / "c.safetensors"),
                          "--memory-budget", "0", "--quiet"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()  # blocks until the run has paused after block 0
        assert line.strip() == "aprender-test: paused", line + p.stderr.read()
        assert os.listdir(out_dir) == []  # the scratch file was unlinked when created
        maps = f"/proc/{p.pid}/maps"
        if os.path.exists(maps):  # Linux: still mapped, from OUTPUT's folder, deleted
            with open(maps) as f:
                assert any(str(out_dir) in ln and "(deleted)" in ln for ln in f)
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == code, err
    assert os.listdir(out_dir) == []
    assert sorted(os.listdir(folder)) == before


def test_tokenizer_larger_than_the_vocabulary_is_one_line(tmp_path, capsys):
    folder = tmp_path / "m"
    tiny(folder, "mistral", vocab_size=6)  # weights and config agree; the tokenizer has 24 ids
    (tmp_path / "t.txt").write_text("vector matrix column\n")
    capsys.readouterr()
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "t.txt"), "-o",
                 str(tmp_path / "c.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside the model's vocabulary of 6" in err


def test_calibrate_then_shrink_a_mixtral(tmp_path):
    """The statistics `shrink` reads come from `calibrate`: a layer dropped by block influence,
    experts removed by REAP, MLP channels refit with the Hessians, end to end on the CLI."""
    if not moe_or_refused(tmp_path, "mixtral"):
        return
    folder = tmp_path / "mix"
    tiny(folder, "mixtral", num_hidden_layers=3)
    (tmp_path / "t.txt").write_text("\n".join(samples(16)) + "\n")
    calib = tmp_path / "c.safetensors"
    assert main(["calibrate", str(folder), "--text", str(tmp_path / "t.txt"), "-o", str(calib),
                 "--hessian", "--quiet"]) == 0
    ctx = CalibrationContext.load(calib)
    influence = {n: s.influence for n, s in ctx.block_stats.items()}
    least = min(influence, key=influence.get)
    report = tmp_path / "r.json"
    assert main(["shrink", str(folder), "-o", str(tmp_path / "small"), "--calibration",
                 str(calib), "--drop-layers", "1", "--experts", "0.5", "--report", str(report),
                 "--quiet"]) == 0
    r = json.loads(report.read_text())
    assert r["layers_kept"] == [i for i in range(3) if f"model.layers.{i}" != least]
    for layer in r["layers_kept"]:
        reap = {e: ctx.expert_stats[f"model.layers.{layer}.block_sparse_moe.experts.{e}"].reap
                for e in range(4)}
        assert sorted(r["experts"][str(layer)]) == sorted(sorted(reap, key=reap.get)[2:])
    cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["num_local_experts"] == 2
