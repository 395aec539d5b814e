"""What ``aprender inspect`` reports: the logical tensors of a checkpoint (compressed groups read
as the tensor a model loads), their sparsity and N:M pattern, the config's sparsity section, the
sparsity of the pruned weights apart from the whole checkpoint, and one provenance line; with
``check=True`` the declared pattern is verified, ``-0.0`` at pruned positions counted and a
``sparsity_config`` that current loaders reject flagged.

:func:`inspect_checkpoint` returns a JSON-ready dict; :func:`render` makes the text the command
prints.  A file that is not a safetensors file is a CheckpointError saying so.
"""
import json
import os
import re

import numpy as np

from ._validation import prune_count
from .io.checkpoint import Checkpoint, read_json
from .io.files import display
from .io.formats import aprender_info, checkpoint_layout, decode
from .io.safetensors import FLOAT_DTYPES

__all__ = ["inspect_checkpoint", "render", "LOADERS_REJECT"]

CHUNK = 1 << 22
PATTERN_MS = (4, 8, 16)
LOADERS_REJECT = ("a sparsity_config in quantization_config: vLLM 0.19.1 and later refuse the "
                  "model, transformers 5 loads sparse-24-bitmask weights as random values; "
                  "run 'aprender densify' for today's loaders")
_SIGN = {2: 0x8000, 4: 0x80000000, 8: 0x8000000000000000}
_ABS = {2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}


def _zero_and_negzero(words, code):
    """(zero mask, number of -0.0) of a chunk of raw words."""
    if code in FLOAT_DTYPES:
        size = words.itemsize
        z = (words & words.dtype.type(_ABS[size])) == 0
        neg = int(np.count_nonzero(words == words.dtype.type(_SIGN[size])))
        return z, neg
    return words == 0, 0


def _scan(words, lt):
    """zeros, -0.0 count, the fewest zeros in any row (along the last axis), and for each M
    dividing the last axis the largest number of non-zeros in any group of M consecutive
    elements."""
    n = lt.size
    last = lt.shape[-1] if lt.shape else 0
    ms = [m for m in PATTERN_MS if last and last % m == 0]
    worst = {m: 0 for m in ms}
    zeros = negz = 0
    row_min = last
    step = last * max(1, CHUNK // last) if last else max(n, 1)  # whole rows per chunk
    for a in range(0, n, step):
        z, neg = _zero_and_negzero(words[a:a + step], lt.dtype)
        zeros += int(np.count_nonzero(z))
        negz += neg
        if last and z.size:
            row_min = min(row_min, int(z.reshape(-1, last).sum(axis=1, dtype=np.int64).min()))
        for m in ms:
            nz = m - z.reshape(-1, m).sum(axis=1, dtype=np.int64)
            if nz.size:
                worst[m] = max(worst[m], int(nz.max()))
    return zeros, negz, worst, row_min


def _pattern(worst, n, zeros):
    """"N:M" when every group of M along the last axis holds at most N non-zeros with N <= M/2
    (the sparsest such, smallest M on ties); "unstructured" for other tensors with zeros;
    "all zeros" for a non-empty tensor without a non-zero (not the vacuous "0:4")."""
    if n and zeros == n:
        return "all zeros"
    best = None
    for m, k in worst.items():
        if k * 2 <= m and (best is None or k / m < best[0]):
            best = (k / m, f"{k}:{m}")
    if best is not None and zeros:
        return best[1]
    return "unstructured" if zeros else "dense"


def _config(ckpt):
    """config.json of a folder, or the X.config.json written alongside a single file."""
    if ckpt.is_dir:
        path = os.path.join(ckpt.path, "config.json")
        name = "config.json"
    else:
        stem = ckpt.path[:-len(".safetensors")] if ckpt.path.endswith(".safetensors") \
            else ckpt.path
        path, name = stem + ".config.json", os.path.basename(stem) + ".config.json"
    if not os.path.isfile(path):
        return None, None
    cfg = read_json(path)
    return (cfg if isinstance(cfg, dict) else None), name


def _provenance(ckpt):
    """One record per distinct aprender setting (the per-shard list of pruned tensors aside):
    ``shards``, ``settings`` and ``pruned`` (the listed names of all those shards, or None)."""
    seen = {}
    for s in ckpt.shards:
        raw = ckpt.files[s].metadata.get("aprender")
        if raw is None:
            continue
        info = aprender_info(ckpt.files[s].metadata)
        listed = None
        if isinstance(info, dict):
            info = dict(info)
            listed = info.pop("pruned", None)
            key = json.dumps(info, sort_keys=True)
        else:
            info, key = raw, raw
        rec = seen.setdefault(key, {"shards": [], "settings": info, "pruned": None})
        rec["shards"].append(s)
        if isinstance(listed, list):
            rec["pruned"] = (rec["pruned"] or []) + [x for x in listed if isinstance(x, str)]
    for rec in seen.values():
        rec["shards"].sort()
    return sorted(seen.values(), key=lambda r: r["shards"][0])


def _declared(prov, sparsity_config):
    """The N:M pattern the checkpoint declares (aprender metadata or the config), or None."""
    for p in prov:
        pat = p["settings"].get("pattern") if isinstance(p["settings"], dict) else None
        if _nm_text(pat):
            return pat
    if isinstance(sparsity_config, dict):
        st = sparsity_config.get("sparsity_structure")
        if _nm_text(st):
            return st
    return None


def _nm_text(text):
    """True for an N:M text with 0 < N <= M <= 1024 (anything else is not checked as one)."""
    m = re.fullmatch(r"(\d{1,4}):(\d{1,4})", text) if isinstance(text, str) else None
    return bool(m) and 0 < int(m.group(1)) <= int(m.group(2)) <= 1024


def _pruned_names(rows, prov, sparsity_config):
    """Names of the pruned weights: compressed tensors, the config's targets, and the tensors
    aprender's metadata lists as pruned.  The regular expressions it records are untrusted
    (a crafted one backtracks for ever) and are never run; only aprender's own default rule is
    evaluated, for metadata without the list."""
    from .checkpoints import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

    names = {r["name"] for r in rows if r["encoding"] != "dense"}
    if isinstance(sparsity_config, dict) and isinstance(sparsity_config.get("targets"), list):
        t = {x + ".weight" for x in sparsity_config["targets"] if isinstance(x, str)}
        names |= {r["name"] for r in rows if r["name"] in t}
    for p in prov:
        st = p["settings"] if isinstance(p["settings"], dict) else {}
        mine = [r for r in rows if r["file"] in p["shards"]]
        if p["pruned"] is not None:
            listed = set(p["pruned"])
            names |= {r["name"] for r in mine if r["name"] in listed}
            continue
        sel = st.get("selection")
        if not isinstance(sel, dict) or sel.get("include") != [DEFAULT_INCLUDE] \
                or sel.get("exclude") != [DEFAULT_EXCLUDE]:
            continue
        names |= {r["name"] for r in mine
                  if r["dtype"] in FLOAT_DTYPES and len(r["shape"]) == 2
                  and re.search(r"(^|\.)weight$", r["name"])
                  and not re.search(DEFAULT_EXCLUDE, r["name"])}
    return names


def inspect_checkpoint(path, *, check=False, n_threads=None):
    """The inspection report of a checkpoint file or folder (a dict, JSON-ready)."""
    ckpt = Checkpoint(path)
    rows = []
    layout = checkpoint_layout(ckpt)
    for s in ckpt.shards:
        sf = ckpt.files[s]
        for lt in layout[s]:
            words = decode(sf, lt, n_threads)
            zeros, negz, worst, row_min = _scan(words, lt)
            del words
            n = lt.size
            rows.append({"name": lt.name, "file": s, "shape": list(lt.shape),
                         "dtype": lt.dtype, "encoding": lt.encoding, "total": n,
                         "stored_bytes": lt.stored_bytes, "zeros": zeros,
                         "negative_zeros": negz,
                         "sparsity": zeros / n if n else 0.0,
                         "pattern": _pattern(worst, n, zeros) if lt.dtype in FLOAT_DTYPES
                         and n else None,
                         "max_nonzeros": {str(m): k for m, k in worst.items()},
                         "min_row_zeros": row_min})
    cfg, cfg_name = _config(ckpt)
    qc = cfg.get("quantization_config") if cfg else None
    sc = qc.get("sparsity_config") if isinstance(qc, dict) else None
    prov = _provenance(ckpt)
    pruned = _pruned_names(rows, prov, sc)
    for r in rows:
        r["pruned"] = r["name"] in pruned
    total = sum(r["total"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    pt = sum(r["total"] for r in rows if r["pruned"])
    pz = sum(r["zeros"] for r in rows if r["pruned"])
    report = {
        "path": os.path.abspath(ckpt.path),
        "shards": list(ckpt.shards),
        "tensors": rows,
        "totals": {"tensors": len(rows), "elements": total, "zeros": zeros,
                   "sparsity": zeros / total if total else 0.0,
                   "stored_bytes": sum(ckpt.files[s].size for s in ckpt.shards)},
        "pruned_weights": {"tensors": sum(r["pruned"] for r in rows), "elements": pt,
                           "zeros": pz, "sparsity": pz / pt if pt else 0.0},
        "config": {"file": cfg_name, "sparsity_config": sc} if cfg_name else None,
        "provenance": prov,
        "metadata": {s: ckpt.files[s].metadata for s in ckpt.shards},
    }
    if check:
        report["checks"] = _checks(rows, prov, qc, sc)
        report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def _checks(rows, prov, qc, sc):
    checks = []
    declared = _declared(prov, sc)
    pruned = [r for r in rows if r["pruned"]]
    if declared is not None:
        n, m = (int(x) for x in declared.split(":"))
        bad = [r["name"] for r in pruned
               if r["shape"] and (r["shape"][-1] % m or r["max_nonzeros"].get(str(m), m + 1) > n)]
        checks.append({"check": "pattern", "ok": not bad, "declared": declared,
                       "tensors": len(pruned), "failing": bad,
                       "detail": (f"every group of {m} along the last axis of the "
                                  f"{len(pruned)} pruned tensors holds at most {n} non-zeros"
                                  if not bad else f"{len(bad)} pruned tensors break {declared}")})
    checks += _sparsity_checks(rows, prov)
    negz = {r["name"]: r["negative_zeros"] for r in pruned if r["negative_zeros"]}
    checks.append({"check": "negative-zeros", "ok": not negz, "count": sum(negz.values()),
                   "failing": sorted(negz),
                   "detail": ("no -0.0 in the pruned tensors" if not negz else
                              f"{sum(negz.values())} -0.0 values in {len(negz)} pruned tensors "
                              "(some kernels have turned these into garbage output)")})
    if sc is not None:
        checks.append({"check": "loaders", "ok": False, "detail": LOADERS_REJECT})
    elif isinstance(qc, dict) and qc.get("format") == "dense" and "config_groups" not in qc:
        checks.append({"check": "loaders", "ok": False,
                       "detail": "quantization_config has \"format\": \"dense\" without "
                                 "config_groups; compressed-tensors rejects it"})
    else:
        checks.append({"check": "loaders", "ok": True,
                       "detail": "no sparsity_config for loaders to reject"})
    return checks


def _sparsity_checks(rows, prov):
    """The recorded unstructured / per-row sparsity holds: at least the pruned count of zeros
    per tensor (layer scope), over all pruned tensors (global scope) or per row (per-row).
    Zeros already in the weights only add to the count, hence "at least"."""
    out = []
    for p in prov:
        st = p["settings"]
        if not isinstance(st, dict) or st.get("pattern") not in ("unstructured", "per-row"):
            continue
        s = st.get("sparsity")
        alloc = st.get("allocation") if isinstance(st.get("allocation"), dict) else {}
        mine = [r for r in rows if r["pruned"] and r["file"] in p["shards"]]
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s <= 1:
            continue
        if alloc.get("method", "uniform") != "uniform":
            out.append({"check": "sparsity", "ok": True, "skipped": True,
                        "declared": st["pattern"], "failing": [],
                        "detail": f"{alloc.get('method')} allocation: per-layer sparsities are "
                                  "not recorded, not verified"})
            continue
        if st["pattern"] == "per-row":
            bad = [r["name"] for r in mine
                   if r["shape"] and r["min_row_zeros"] < prune_count(s, r["shape"][-1])]
            what = f"every row of the {len(mine)} pruned tensors has {s:.2%} zeros or more"
        elif st.get("scope") == "global":
            total = sum(r["total"] for r in mine)
            ok = sum(r["zeros"] for r in mine) >= prune_count(s, total)
            bad = [] if ok else sorted(r["name"] for r in mine)
            what = f"the {len(mine)} pruned tensors together have {s:.2%} zeros or more"
        else:
            bad = [r["name"] for r in mine if r["zeros"] < prune_count(s, r["total"])]
            what = f"each of the {len(mine)} pruned tensors has {s:.2%} zeros or more"
        out.append({"check": "sparsity", "ok": not bad, "declared": f"{st['pattern']} {s}",
                    "failing": bad,
                    "detail": what if not bad else f"{len(bad)} pruned tensors have fewer "
                                                   f"zeros than {st['pattern']} {s} prunes"})
    return out


def _shape(shape):
    return "x".join(map(str, shape)) or "scalar"


def render(report, table):
    """The text of ``aprender inspect`` (``table``: the plain-text table maker of the CLI)."""
    rows = report["tensors"]
    lines = [table(["tensor", "shape", "dtype", "stored as", "sparsity", "pattern", "pruned"],
                   [[r["name"], _shape(r["shape"]), r["dtype"], r["encoding"],
                     f"{r['sparsity']:.2%}", r["pattern"] or "-", "yes" if r["pruned"] else ""]
                    for r in rows], right=(4,))]
    t, p = report["totals"], report["pruned_weights"]
    lines.append(f"{t['tensors']} tensors, {t['elements']} elements, {t['sparsity']:.2%} zeros "
                 f"overall; {t['stored_bytes']} bytes on disk")
    if p["tensors"]:
        lines.append(f"pruned weights: {p['tensors']} tensors, {p['elements']} elements, "
                     f"sparsity {p['sparsity']:.2%}")
    cfg = report["config"]
    if cfg is not None:
        sc = cfg["sparsity_config"]
        if sc is None:
            lines.append(f"{display(cfg['file'])}: no sparsity_config")
        else:
            keys = {k: sc.get(k) for k in ("format", "sparsity_structure", "global_sparsity")
                    if isinstance(sc, dict)}
            targets = sc.get("targets") if isinstance(sc, dict) else None
            ntargets = len(targets) if isinstance(targets, list) else 0
            lines.append(f"{display(cfg['file'])}: sparsity_config "
                         + display(", ".join(f"{k}={v}" for k, v in keys.items()))
                         + f", {ntargets} targets")
    for pv in report["provenance"]:
        s = pv["settings"]
        where = "" if len(pv["shards"]) == len(report["shards"]) else \
            f" ({len(pv['shards'])} of {len(report['shards'])} shards)"
        if isinstance(s, dict):
            text = ", ".join(f"{k} {s[k]}" for k in ("pattern", "sparsity", "scope",
                                                     "importance", "format")
                             if s.get(k) is not None)
            lines.append(f"pruned by aprender {s.get('version', '?')}: {text}{where}")
        else:
            lines.append(f"pruned by aprender: {s}{where}")
    for c in report.get("checks", []):
        state = "skipped" if c.get("skipped") else "ok" if c["ok"] else "FAILED"
        lines.append(f"check {c['check']}: {state}: {c['detail']}"
                     + (f" ({', '.join(c['failing'][:5])}"
                        f"{', ...' if len(c['failing']) > 5 else ''})" if c.get("failing")
                        else ""))
    return "\n".join([lines[0]] + [display(x) for x in lines[1:]])  # the table is escaped
