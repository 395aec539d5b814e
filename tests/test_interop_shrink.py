"""Structured exports read by transformers 4 (the [interop] environment; run with
``pytest -m interop``): for every family, a tiny model built and saved by transformers 4, cut on
every axis the family supports, loads with no missing or unexpected keys and its outputs equal
the masked original's (tests/shrink_models.py), as they do with transformers 5 in
tests/test_shrink_export.py."""
import pytest

from aprender.structured.export import export_structured

pytestmark = pytest.mark.interop

try:  # not at collection through importorskip: the main run deselects these tests
    import torch  # noqa: F401
    import transformers
except ImportError as exc:
    MISSING = str(exc)
else:
    MISSING = None if transformers.__version__.startswith("4.") else \
        f"transformers {transformers.__version__} is not 4.x"

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "qwen3_moe", "mixtral",
            "bert"]


@pytest.fixture(autouse=True, scope="module")
def _interop_packages():
    if MISSING is not None:
        pytest.skip(f"needs the [interop] extra (transformers 4): {MISSING}")


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers4_loads_the_export(family, tmp_path):
    import shrink_models as sm

    axes = sm.families()[family][2]
    src = sm.build(family, str(tmp_path / "model"))
    sm.check(family, src, axes, str(tmp_path), lambda s, o, p: export_structured(s, o, p))
