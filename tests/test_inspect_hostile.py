"""`aprender inspect` never crashes on hostile metadata or config values: whatever JSON a shard's
``aprender`` metadata or the config's ``sparsity_config`` holds, inspect (and --check, and the
text rendering) either reports it or raises a typed CheckpointError."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aprender.cli import _fmt_table
from aprender.errors import CheckpointError
from aprender.inspect import inspect_checkpoint, render
from aprender.io import write_safetensors

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["2:4", "2:0", "0:4", "9:4", "4:99999", "per-row",
                                            "unstructured", "bitmask", "sparse-24-bitmask", "x.weight",
                                            "x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["pattern", "pruned", "format", "scope", "sparsity", "targets",
                         "sparsity_structure", "global_sparsity", "ignore", "importance",
                         "selection", "x"]), inner, max_size=5),
    max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=JSON, sc=JSON)
def test_inspect_survives_hostile_values(tmp_path, meta, sc):
    folder = tmp_path / "ck"
    folder.mkdir(exist_ok=True)
    w = np.zeros((4, 8), np.float32)
    w[:, ::2] = 1.0
    write_safetensors(folder / "model.safetensors", {"x.weight": w, "b": np.ones(3, np.float16)},
                      {"aprender": json.dumps(meta)})
    (folder / "config.json").write_text(json.dumps({"quantization_config":
                                                    {"sparsity_config": sc}}))
    try:
        for check in (False, True):
            report = inspect_checkpoint(folder, check=check)
            render(report, _fmt_table)
            json.dumps(report)
    except CheckpointError:
        pass


@pytest.mark.parametrize("meta", ['[' * 200000 + ']' * 200000, '{"a":' * 50000 + '1' + '}' * 50000,
                                  '{"format": "bitmask", "format": "dense"}', '1' * 100000])
def test_hostile_metadata_json_is_not_parsed_by_python_json(tmp_path, meta, capsys):
    from aprender.cli import main

    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": np.zeros((2, 4), np.float32)}, {"aprender": meta})
    assert main(["inspect", str(path)]) == 0  # reported as foreign metadata, not a crash
    assert main(["densify", str(path), "-o", str(tmp_path / "d.safetensors"), "--quiet"]) == 0
    assert main(["prune", str(path), "-o", str(tmp_path / "p.safetensors"), "--sparsity", "0.5",
                 "--include", "w", "--quiet"]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("meta,sc", [
    ({"pattern": "2:0", "pruned": ["x.weight"]}, None),
    ({"pattern": "0:0", "pruned": ["x.weight"]}, None),
    ({"pattern": "5:4", "pruned": ["x.weight"]}, None),
    (None, {"targets": 5}),
    (None, {"targets": "x", "sparsity_structure": "3:0"}),
    (None, {"targets": [1, None, "x"], "global_sparsity": {"a": 1}}),
])
def test_inspect_known_hostile_values(tmp_path, meta, sc):
    folder = tmp_path / "ck"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"x.weight": np.zeros((4, 8), np.float32)},
                      {"aprender": json.dumps(meta)})
    (folder / "config.json").write_text(json.dumps({"quantization_config":
                                                    {"sparsity_config": sc}}))
    for check in (False, True):
        render(inspect_checkpoint(folder, check=check), _fmt_table)
