#!/usr/bin/env python3
"""Extract ONNX's BatchNormalization conformance cases into small JSON files.

Sources (all taken from the installed `onnx` package, nothing is invented here):

* node cases ``test_batchnorm_*``: read from
  ``onnx/backend/test/data/node/test_batchnorm_*/`` (.pb files) when the installed
  package ships them (onnx <= 1.22). Newer onnx wheels (>= 1.23) no longer ship the
  node artifacts and instead build them in-process from the case generator
  ``onnx/backend/test/case/node/batch_normalization.py`` (each ``export*`` method
  runs after ``np.random.seed(0)``, done by onnx itself); in that case this script
  takes the very arrays onnx's own backend test suite uses. ``--node-data DIR``
  reads .pb node cases from a directory instead (e.g. ``onnx/backend/test/data/node``
  of an onnx source checkout).
* PyTorch-converted eval cases ``onnx/backend/test/data/pytorch-converted/test_BatchNorm*``:
  ``model.onnx`` (parameters as initializers, attributes on the node) plus
  ``test_data_set_0/input_0.pb`` / ``output_0.pb``.

Every case is checked against a float64 NumPy recomputation of BatchNormalization
(ONNX conventions) before anything is written; the script exits non-zero if any
case does not match.

Usage: python3 ci/gen_onnx_cases.py [--out DIR] [--node-data DIR]
Deps: onnx, numpy.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "data", "onnx")
ONNX_PKG_DIR = os.path.dirname(os.path.abspath(onnx.__file__))
TEST_DATA_DIR = os.path.join(ONNX_PKG_DIR, "backend", "test", "data")

DEFAULT_EPSILON = 1e-5  # ONNX BatchNormalization defaults
DEFAULT_MOMENTUM = 0.9
RTOL = 1e-5
ATOL = 1e-6
OUTPUT_KEYS = ("y", "running_mean", "running_var")


def f32_list(a: np.ndarray) -> list[float]:
    """Flat C-order list of float32 values as Python floats (exact round trip)."""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float32)).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError("non-finite value in case data")
    return [float(v) for v in a]


def f32_scalar(v: float) -> float:
    return float(np.float32(v))


def rel_pkg_path(path: str) -> str:
    """Path relative to the directory holding the onnx package, e.g. onnx/backend/..."""
    return os.path.relpath(path, os.path.dirname(ONNX_PKG_DIR)).replace(os.sep, "/")


def node_attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, float):
            v = f32_scalar(v)  # float attributes are float32 in the proto
        elif isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return dict(sorted(out.items()))


def ai_onnx_opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def is_training(node: onnx.NodeProto, opset: int | None) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if "training_mode" in attrs:  # opset >= 14
        return bool(attrs["training_mode"])
    if "is_test" in attrs:  # opset <= 6
        return not bool(attrs["is_test"])
    # opset 7..13: training is signalled by the optional outputs being requested
    n_out = len([o for o in node.output if o])
    return opset is not None and 7 <= opset < 14 and n_out > 1


def build_case(name, kind, source, model, values, notes=None):
    """values: tensor name -> np.ndarray (graph inputs, initializers, outputs)."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if len(model.graph.node) != 1 or len(bns) != 1:
        raise ValueError(f"{name}: expected a graph with exactly one BatchNormalization node")
    node = bns[0]
    notes = list(notes or [])
    opset = ai_onnx_opset(model)
    attrs = node_attrs(node)
    training = is_training(node, opset)

    x = values[node.input[0]].astype(np.float32)
    c = x.shape[1]
    ins = list(node.input) + [""] * (5 - len(node.input))
    defaults = {1: ("scale", 1.0), 2: ("bias", 0.0), 3: ("input_mean", 0.0), 4: ("input_var", 1.0)}
    params = {}
    for idx, (key, dflt) in defaults.items():
        nm = ins[idx]
        if nm and nm in values:
            params[key] = values[nm].astype(np.float32).reshape(c)
        else:
            params[key] = np.full(c, dflt, dtype=np.float32)
            notes.append(f"{key} absent in the model; written as all {dflt}")

    outs = [o for o in node.output]
    out_arrays = {}
    for i, nm in enumerate(outs[:3]):
        if nm and nm in values:
            out_arrays[OUTPUT_KEYS[i]] = values[nm].astype(np.float32)
    if "y" not in out_arrays:
        raise ValueError(f"{name}: no Y output data")
    if tuple(out_arrays["y"].shape) != tuple(x.shape):
        raise ValueError(f"{name}: Y shape {out_arrays['y'].shape} != X shape {x.shape}")

    eps = f32_scalar(attrs.get("epsilon", DEFAULT_EPSILON))
    mom = f32_scalar(attrs.get("momentum", DEFAULT_MOMENTUM))
    if "epsilon" not in attrs:
        notes.append("epsilon attribute absent; ONNX default 1e-5 (as float32) recorded")
    if "momentum" not in attrs:
        notes.append("momentum attribute absent; ONNX default 0.9 (as float32) recorded")
    if training and "running_var" in out_arrays:
        notes.append(
            "running_var follows ONNX: input_var*momentum + biased_batch_var*(1-momentum) "
            "(PyTorch uses the unbiased batch variance for running_var)"
        )

    case = {
        "name": name,
        "kind": kind,
        "source": source,
        "onnx_version": onnx.__version__,
        "opset": opset,
        "attributes": attrs,
        "mode": "training" if training else "inference",
        "dims": [int(d) for d in x.shape],
        "epsilon": eps,
        "momentum": mom,
        "outputs": [k for k in OUTPUT_KEYS if k in out_arrays],
        "x": x,
        **params,
        **out_arrays,
    }
    if notes:
        case["notes"] = notes
    return case


def reference(case):
    """float64 BatchNormalization per ONNX conventions."""
    shape = case["dims"]
    x = case["x"].astype(np.float64)
    bshape = (1, shape[1]) + (1,) * (len(shape) - 2)
    s, b = (case[k].astype(np.float64).reshape(bshape) for k in ("scale", "bias"))
    m_in = case["input_mean"].astype(np.float64)
    v_in = case["input_var"].astype(np.float64)
    eps, mom = case["epsilon"], case["momentum"]
    ref = {}
    if case["mode"] == "inference":
        mean, var = m_in, v_in
    else:
        axes = tuple(i for i in range(len(shape)) if i != 1)
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)  # biased
        ref["running_mean"] = m_in * mom + mean * (1.0 - mom)
        ref["running_var"] = v_in * mom + var * (1.0 - mom)
    ref["y"] = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + eps) * s + b
    return ref


def check(case) -> bool:
    ref = reference(case)
    ok = True
    parts = []
    for k in case["outputs"]:
        got = case[k].astype(np.float64).ravel()
        want = ref[k].ravel()
        err = np.abs(got - want)
        bad = err > ATOL + RTOL * np.abs(want)
        parts.append(f"{k} max_abs_err={err.max():.3e}")
        if bad.any():
            ok = False
            parts.append(f"({int(bad.sum())} of {bad.size} out of tolerance)")
    print(f"{'ok  ' if ok else 'FAIL'} {case['name']:<40} {case['mode']:<9} dims={case['dims']} "
          f"eps={case['epsilon']:.6g} momentum={case['momentum']:.6g} " + " ".join(parts))
    return ok


# ---------------------------------------------------------------- sources

def load_pb_dir(case_dir):
    """model.onnx + test_data_set_0/{input,output}_*.pb -> (model, values)."""
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    g = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    feeds = [i.name for i in g.input if i.name not in values]
    ds = os.path.join(case_dir, "test_data_set_0")
    for prefix, names in (("input", feeds), ("output", [o.name for o in g.output])):
        files = sorted(glob.glob(os.path.join(ds, f"{prefix}_*.pb")),
                       key=lambda p: int(os.path.basename(p)[len(prefix) + 1:-3]))
        if len(files) != len(names):
            raise ValueError(f"{case_dir}: {len(files)} {prefix} files for {len(names)} {prefix}s")
        for nm, f in zip(names, files):
            values[nm] = numpy_helper.to_array(onnx.load_tensor(f))
    return model, values


def pb_cases(parent, pattern, kind):
    cases = []
    for d in sorted(glob.glob(os.path.join(parent, pattern))):
        if not os.path.isdir(d):
            continue
        name = os.path.basename(d)
        model, values = load_pb_dir(d)
        src = rel_pkg_path(d) if os.path.abspath(d).startswith(ONNX_PKG_DIR) else os.path.abspath(d)
        cases.append(build_case(name, kind, src, model, values))
    return cases


def generated_node_cases():
    """Node cases as onnx >= 1.23 builds them in-process (seeded by onnx itself)."""
    case_pkg = "onnx.backend.test.case.node"
    case_dir = os.path.join(ONNX_PKG_DIR, "backend", "test", "case", "node")
    mod_name = None
    for cand in ("batch_normalization", "batchnorm"):
        if os.path.exists(os.path.join(case_dir, cand + ".py")):
            mod_name = cand
            break
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if mod_name is not None:
            importlib.import_module(f"{case_pkg}.{mod_name}")  # runs the export* methods
            tcs = importlib.import_module(case_pkg)._NodeTestCases
        else:
            from onnx.backend.test.case.node import collect_testcases
            tcs = collect_testcases("BatchNormalization")
    gen_file = f"onnx/backend/test/case/node/{mod_name}.py" if mod_name else "onnx/backend/test/case/node"
    cases = []
    for tc in sorted(tcs, key=lambda t: t.name):
        if not tc.name.startswith("test_batchnorm") or "_expanded" in tc.name:
            continue
        model = tc.model
        (inputs, outputs), = tc.data_sets
        g = model.graph
        values = {i.name: np.asarray(a) for i, a in zip(g.input, inputs)}
        values.update({o.name: np.asarray(a) for o, a in zip(g.output, outputs)})
        src = (f"{gen_file} (generated in-process by onnx.backend.test.case.node, "
               f"np.random.seed(0) per export method; would be onnx/backend/test/data/node/{tc.name})")
        cases.append(build_case(tc.name, "node", src, model, values))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--node-data", default=None,
                    help="directory holding test_batchnorm_*/ node cases as .pb "
                         "(default: the installed package's, else onnx's in-process generator)")
    args = ap.parse_args()

    print(f"onnx {onnx.__version__} at {ONNX_PKG_DIR}; numpy {np.__version__}")
    node_dir = args.node_data or os.path.join(TEST_DATA_DIR, "node")
    if glob.glob(os.path.join(node_dir, "test_batchnorm_*")):
        node_cases = pb_cases(node_dir, "test_batchnorm_*", "node")
    else:
        if args.node_data:
            print(f"error: no test_batchnorm_* under {args.node_data}", file=sys.stderr)
            return 2
        node_cases = generated_node_cases()
    pt_cases = pb_cases(os.path.join(TEST_DATA_DIR, "pytorch-converted"), "test_BatchNorm*",
                        "pytorch-converted")
    cases = node_cases + pt_cases
    if not node_cases or not pt_cases:
        print("error: found no node cases or no pytorch-converted cases", file=sys.stderr)
        return 2

    results = [check(c) for c in cases]
    if not all(results):
        print(f"error: {results.count(False)} case(s) failed the float64 check; nothing written",
              file=sys.stderr)
        return 1

    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "*.json")):
        os.remove(old)
    total = 0
    for c in cases:
        doc = {k: (f32_list(v) if isinstance(v, np.ndarray) else v) for k, v in c.items()}
        path = os.path.join(args.out, f"{c['kind']}_{c['name']}.json")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            json.dump(doc, f, sort_keys=True, separators=(",", ":"), allow_nan=False)
            f.write("\n")
        total += os.path.getsize(path)
    print(f"wrote {len(cases)} files, {total} bytes, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
