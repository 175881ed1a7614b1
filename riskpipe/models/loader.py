"""``load_model(spec)``: one entry point for every model format riskpipe accepts.

Specs:
  ``demo:NAME``                     a demo model (``demo:digits``)
  ``PATH.pt`` / ``PATH.ts``          a TorchScript file
  ``PATH.onnx``                      an ONNX file (onnxruntime; smoothing only). The class
                                     scores are its one (batch, classes) float output (name
                                     it with ``?output=NAME`` where there are several), or
                                     a ZipMap (skl2onnx classifiers: label first, then
                                     probabilities); a fixed batch dimension is run in
                                     chunks of that size, the last one padded
  ``module:factory@WEIGHTS``         ``factory()`` builds the nn.Module, weights loaded
                                     with ``torch.load(weights_only=True)``; its sha256
                                     covers the weights and the code of the factory's
                                     and the layers' packages (riskpipe.models.code_digest)
  ``PATH.skops``                     a scikit-learn estimator saved with skops; only types
                                     skops trusts, the tree ensembles' ``TREE_TYPES`` and
                                     the config's ``trusted_types`` are loaded
  ``PATH.json`` / ``PATH.ubj``        an XGBoost booster (native JSON / UBJSON), and
  ``PATH.txt``                       a LightGBM booster (text model): extra ``riskpipe[trees]``;
                                     ``?format=xgboost|lightgbm`` for other file names
Tree ensembles (skops, XGBoost, LightGBM) also get ``model.trees``, their flat node
arrays (riskpipe.models.trees), which the ``trees`` certificate and attack use.
Options after ``?`` set the input spec where the file cannot carry it, e.g.
``model.onnx?shape=1,8,8&classes=10&range=0,1``. ``?binary=logit|probability`` reads a
torch or ONNX model with one output (n, 1) or (n,) as two class scores: class 1 where the
logit is > 0 or the probability > 0.5 (riskpipe.models.layers.BinaryScores). Without it
such a model is refused: a Model needs at least two classes. An option not in
``OPTIONS``, one given twice, or one the format does not read is refused.

Nothing here unpickles an untrusted file.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import sklearn
import torch
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier, ExtraTreeClassifier
from torch import nn

from riskpipe.models import demo
from riskpipe.models import trees as _trees
from riskpipe.models.base import (
    BINARY_HINT,
    BINARY_THRESHOLDS,
    Model,
    ModelError,
    ModelFault,
    ShapeUnknown,
    one_line,
    sha256_file,
    sha256_state_dict,
)
from riskpipe.models.code_digest import code_roots, code_sha256
from riskpipe.models.digits import INPUT_SHAPE, NUM_CLASSES, reference_file
from riskpipe.models.layers import BinaryScores
from riskpipe.models.output import BadOutput

# every ?option= a spec may carry (which loader reads which: the module docstring); a
# misspelt one (?rnage=0,1) was ignored, and with it the input range check
OPTIONS = ("shape", "classes", "range", "binary", "format", "output", "sigma")


def _options(spec: str) -> tuple[str, dict[str, str]]:
    """(the spec before ``?``, its options); an option not in OPTIONS, or given twice, is a
    ModelError naming it."""
    if "?" not in spec:
        return spec, {}
    base, q = spec.split("?", 1)
    pairs = parse_qsl(q, keep_blank_values=True)
    names = [k for k, _ in pairs]
    for k in names:
        if k not in OPTIONS:
            known = ", ".join(f"?{o}=" for o in OPTIONS)
            raise ModelError(f"model {spec}: unknown option ?{k}= (options: {known})")
        if names.count(k) > 1:
            raise ModelError(f"model {spec}: option ?{k}= given twice")
    return base, dict(pairs)


def _shape_opts(opts: dict[str, str], spec: str, default_shape=None, default_classes=None):
    try:
        shape = tuple(int(s) for s in opts["shape"].split(",")) if "shape" in opts else default_shape
        classes = int(opts["classes"]) if "classes" in opts else default_classes
        rng = tuple(float(s) for s in opts["range"].split(",")) if "range" in opts else None
    except ValueError as e:
        raise ModelError(f"model {spec}: bad option ({e})") from None
    if shape is None:
        raise ShapeUnknown(f"model {spec}: input shape unknown; add ?shape=C,H,W (or give inputs to take it from)")
    if rng is not None and (len(rng) != 2 or not rng[0] < rng[1]):
        raise ModelError(f"model {spec}: range must be lo,hi with lo < hi")
    if rng is not None and not all(np.isfinite(v) and abs(v) <= float(np.finfo(np.float32).max) for v in rng):
        raise ModelError(f"model {spec}: ?range= must be finite (within float32); leave it out to check finiteness "
                         "only")
    return shape, classes, rng


def _probe_output(forward, shape: tuple[int, ...], spec: str) -> tuple[int, ...]:
    """The output shape of one forward pass on a zero input; a model that raises, returns
    no tensor, or returns integer class ids (which do not give the class count: that takes
    ``?classes=N``) is a one-line ModelError."""
    try:
        out = forward(np.zeros((1,) + tuple(shape), np.float32))
    except Exception as e:  # noqa: BLE001 - whatever the user's model raises
        raise ModelFault(spec, f"forward pass raised {type(e).__name__}: {one_line(e)}") from None
    if not hasattr(out, "shape"):
        raise ModelFault(spec, f"output must be (batch, classes) logits, got {type(out).__name__}")
    if out.shape == (1,) and not (out.is_floating_point() if torch.is_tensor(out) else
                                  np.issubdtype(np.asarray(out).dtype, np.floating)):
        raise ModelError(f"model {spec}: the model returns class ids, which do not say how many classes there "
                         "are; add ?classes=N")
    return tuple(int(d) for d in out.shape)


# The output shape, for one input, of a model with one score per input: (n,) or (n, 1).
_ONE_SCORE = ((1,), (1, 1))


def _refuse_one_score(spec: str, out: tuple[int, ...]) -> None:
    """A model with one score per input (``out`` for one input) read as class scores: one
    line naming ``?binary=`` (and, for (n,), what a model returning class ids does)."""
    if out in _ONE_SCORE:
        ids = "; a model that returns class ids returns them as integers, with ?classes=N" if out == (1,) else ""
        raise ModelFault(spec, f"output has one score per input (shape {out} for one input), not one per class; "
                               f"{BINARY_HINT}{ids}")


def _probe_classes(forward, shape: tuple[int, ...], spec: str) -> int:
    """The number of classes from one forward pass on a zero input (``?classes=N`` skips it);
    a model that raises or returns no (1, C) logits is a one-line ModelError, and one
    output per input names the ``?binary=`` option."""
    out = _probe_output(forward, shape, spec)
    _refuse_one_score(spec, out)
    if len(out) != 2 or out[0] != 1:
        raise ModelFault(spec, f"output must be (batch, classes) logits, got shape {out}")
    return out[1]


def _binary(opts: dict[str, str], spec: str) -> float | None:
    """The class-0 score of ``?binary=logit|probability`` (None without the option)."""
    kind = opts.get("binary")
    if kind is None:
        return None
    if kind not in BINARY_THRESHOLDS:
        raise ModelError(f"model {spec}: binary={kind!r}: must be one of {', '.join(BINARY_THRESHOLDS)}")
    return BINARY_THRESHOLDS[kind]


def _one_score(out: tuple[int, ...], spec: str, kind: str) -> None:
    if out not in _ONE_SCORE:
        raise ModelError(f"model {spec}: binary={kind}: the model must give one score per input, (n, 1) or (n,); "
                         f"it gives shape {out} for one input")


def _module_forward(module: torch.nn.Module):
    def forward(x: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(x))
    return forward


def _torch_model(spec: str, module: torch.nn.Module, opts, sha: str, default_shape=None,
                 meta: dict | None = None) -> Model:
    module.eval()
    shape, classes, rng = _shape_opts(opts, spec, default_shape)
    meta = dict(meta or {})
    threshold = _binary(opts, spec)
    if threshold is not None:  # (n, 1) -> (n, 2) scores by one more linear layer (BinaryScores)
        _one_score(_probe_output(_module_forward(module), shape, spec), spec, opts["binary"])
        head = BinaryScores(threshold)
        module = nn.Sequential(module, head)  # the user's module whole: a Sequential subclass keeps its forward
        module.eval()
        meta["binary"] = opts["binary"]
    classes = classes or _probe_classes(_module_forward(module), shape, spec)
    return Model(spec=spec, input_shape=tuple(shape), num_classes=classes, sha256=sha, value_range=rng, module=module,
                 meta=meta)


def _load_demo(spec: str, name: str, opts) -> Model:
    if name not in demo.DEMOS:
        raise ModelError(f"model {spec}: unknown demo model {name!r} (known: {', '.join(sorted(demo.DEMOS))})")
    if set(opts) - {"sigma"}:  # ?range=1,0 was ignored without a word: the demo's inputs are [0, 1] 8x8 digits
        raise ModelError(f"model {spec}: a demo model takes only ?sigma= (its input shape, classes and range "
                         f"[0, 1] are fixed), not {', '.join('?' + k + '=' for k in sorted(set(opts) - {'sigma'}))}")
    sigma = float(opts["sigma"]) if "sigma" in opts else None
    module = demo.build_demo(name, sigma=sigma)
    recipe = demo.DEMOS[name][0]

    return Model(
        spec=spec,
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        sha256=sha256_state_dict(module),
        value_range=(0.0, 1.0),
        module=module,
        default_reference=str(reference_file()),
        meta={"demo": name, "train_sigma": sigma if sigma is not None else recipe.sigma},
    )


def _load_factory(spec: str, base: str, opts) -> Model:
    target, _, weights = base.partition("@")
    mod_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"model {spec}: cannot import factory {target!r} ({e})") from None
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 - whatever the user's factory raises
        raise ModelError(f"model {spec}: factory {target!r} raised {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"model {spec}: factory {target!r} did not return an nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise ModelError(f"model {spec}: weights file {weights!r} not found")
        try:
            state = torch.load(weights, weights_only=True, map_location="cpu")
            module.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad model file
            raise ModelError(f"model {spec}: cannot load weights ({type(e).__name__}: {e})") from None
    # the weights and the code that computes with them (riskpipe.models.code_digest)
    weights_sha = sha256_state_dict(module)
    try:
        roots = code_roots(factory, module, mod_name)
        code_sha = code_sha256(roots)
    except (ValueError, OSError) as e:
        raise ModelError(f"model {spec}: {e}") from None
    sha = hashlib.sha256(f"{weights_sha}\x00{code_sha}".encode()).hexdigest()
    meta = {"weights_sha256": weights_sha, "code_sha256": code_sha, "code_packages": roots}
    return _torch_model(spec, module, opts, sha, getattr(module, "input_shape", None), meta)


def _labels_follow_scores(sess, input_name: str, out_index: int, zipmap: bool, keys: list, shape, dtype, rng,
                          fixed: int | None, names: list[str] | None) -> bool:
    """Does the model's own label output (skl2onnx's first output: a rank-1 tensor of
    labels) name, on 33 probe inputs, the class of the score column it scores highest, as
    ``names`` (or the column index, without names) say? True when it has no label output."""
    outputs = sess.get_outputs()
    label_at = next((i for i, o in enumerate(outputs) if i != out_index and len(o.shape or ()) == 1
                     and o.type in ("tensor(int64)", "tensor(string)")), None)
    if label_at is None:
        return True
    n = fixed or 33
    rnd = np.random.default_rng(0)
    if rng is not None:
        lo, hi = (np.broadcast_to(np.asarray(v, dtype=np.float64), tuple(shape)) for v in rng)
        batch = lo + (hi - lo) * rnd.random((n, *shape))
    else:
        batch = rnd.standard_normal((n, *shape)) * 3
    batch[0] = 0
    try:
        out = sess.run(None, {input_name: batch.astype(dtype)})
    except Exception:  # noqa: BLE001 - a fixed batch it will not take here: labels unknown, fail closed
        return False
    scores = out[out_index]
    if zipmap:
        scores = np.array([[row[k] for k in keys] for row in scores], dtype=np.float64)
    top = np.argmax(np.asarray(scores, dtype=np.float64).reshape(n, -1), axis=1)
    want = [names[i] if names is not None else str(i) for i in top]
    got = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(out[label_at]).reshape(-1)]
    return got == want


ONNX_CLASSIFIERS = ("LinearClassifier", "TreeEnsembleClassifier", "SVMClassifier", "ZipMap")


def _onnx_class_labels(path: Path) -> list | None:
    """The class labels an ONNX-ML classifier node declares (``classlabels_ints``,
    ``classlabels_int64s`` or ``classlabels_strings``: skl2onnx writes the estimator's ``classes_`` there, in the order
    of its score columns), or None. Without them a model exported without a ZipMap would
    have an event's label ``predict()`` gave read as a class id (riskpipe.stream.events)."""
    try:
        import onnx  # optional: the [onnx] extra, which gives onnxruntime, gives onnx too
    except ImportError:
        raise ModelError(f"model {path}: reading an ONNX model's class labels needs the onnx package "
                         "(pip install 'riskpipe[onnx]')") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    for node in graph.node:
        if node.domain == "ai.onnx.ml" and node.op_type in ONNX_CLASSIFIERS:
            for a in node.attribute:
                if a.name in ("classlabels_ints", "classlabels_int64s") and a.ints:
                    return list(a.ints)
                if a.name == "classlabels_strings" and a.strings:
                    return [v.decode("utf-8", "replace") for v in a.strings]
    return None


def _score_output(sess, spec: str, one_score: bool = False, name: str | None = None):
    """(index, is_zipmap) of the output that carries class scores: the output ``name``
    (``?output=``), else the one rank-2 float tensor (or rank 1, with ``one_score``: a
    binary model's one output per input), else a ZipMap's sequence of {class: probability}
    maps. skl2onnx classifiers put the label first and the probabilities second (as a
    ZipMap unless disabled). Two float outputs that could both be the scores (an embedding
    and the logits) are refused without ``?output=``: taking the first made an embedding
    an N-class classifier."""
    outputs = sess.get_outputs()
    ranks = (1, 2) if one_score else (2,)

    def scores_like(o) -> bool:
        return o.type in ("tensor(float)", "tensor(double)") and len(o.shape or ()) in ranks

    shown = ", ".join(f"{o.name} {o.type}" for o in outputs)
    if name is not None:
        i = next((i for i, o in enumerate(outputs) if o.name == name), None)
        if i is None:
            raise ModelError(f"model {spec}: ?output={name}: the model has no such output (outputs: {shown})")
        if not (scores_like(outputs[i]) or outputs[i].type.startswith("seq(map(")):
            raise ModelError(f"model {spec}: ?output={name}: {outputs[i].type} of rank {len(outputs[i].shape or ())} "
                             "cannot hold class scores; need a (batch, classes) float tensor")
        return i, outputs[i].type.startswith("seq(map(")
    found = [i for i, o in enumerate(outputs) if scores_like(o)]
    if len(found) > 1:
        raise ModelError(f"model {spec}: {len(found)} outputs could hold the class scores "
                         f"({', '.join(outputs[i].name for i in found)}); name one with ?output=NAME")
    if found:
        return found[0], False
    for i, o in enumerate(outputs):
        if o.type.startswith("seq(map("):
            return i, True
    one = any(o.type in ("tensor(float)", "tensor(double)") and len(o.shape or ()) == 1 for o in outputs)
    raise ModelError(f"model {spec}: no ONNX output holds class scores (outputs: {shown}); need a (batch, classes) "
                     f"float tensor" + (f"; {BINARY_HINT}" if one else ""))


def _load_onnx(spec: str, path: Path, opts) -> Model:
    try:
        import onnxruntime as ort  # optional: onnxruntime is the optional [onnx] extra
    except ImportError:
        raise ModelError(f"model {spec}: onnxruntime is not installed (pip install 'riskpipe[onnx]')") from None
    options = ort.SessionOptions()  # ONNX Runtime's own thread pools follow the stage's torch_threads
    options.intra_op_num_threads = torch.get_num_threads()  # (compose sets it before models load)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise ModelError(f"model {spec}: not a loadable ONNX file ({type(e).__name__}: {one_line(e, 200)})") from None
    inp = sess.get_inputs()[0]
    file_shape = tuple(d for d in inp.shape[1:]) if all(isinstance(d, int) for d in inp.shape[1:]) else None
    shape, classes, rng = _shape_opts(opts, spec, file_shape)
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    threshold = _binary(opts, spec)
    out_index, zipmap = _score_output(sess, spec, one_score=threshold is not None, name=opts.get("output"))
    keys: list = []

    def run(chunk: np.ndarray) -> np.ndarray:
        out = sess.run(None, {inp.name: chunk})[out_index]
        if zipmap:  # [{class: p}, ...] with the same keys in every row
            if not keys:
                keys.extend(sorted(out[0]))
            return np.array([[row[k] for k in keys] for row in out], dtype=np.float64)
        return np.asarray(out)

    def scores(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=dtype).reshape((len(batch),) + tuple(shape))
        if fixed is None:
            return run(batch)
        parts = []  # a fixed batch dimension: chunks of that size, the last one padded with its last row
        for a in range(0, len(batch), fixed):
            chunk = batch[a:a + fixed]
            n = len(chunk)
            if n < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
            parts.append(run(chunk)[:n])
        return np.concatenate(parts)

    try:
        probe = scores(np.zeros((1,) + tuple(shape), dtype))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model {spec}: the model does not run on a (1, {', '.join(map(str, shape))}) input "
                         f"({type(e).__name__}: {one_line(e, 200)}); set ?shape=") from None
    meta: dict = {}
    if threshold is not None:  # one score per input -> (threshold, score): class 1 where the score is above it
        _one_score(tuple(probe.shape), spec, opts["binary"])
        one = scores

        def scores(batch: np.ndarray) -> np.ndarray:
            z = np.asarray(one(batch), dtype=np.float64).reshape(len(batch), -1)
            return np.concatenate([np.full_like(z, threshold), z], axis=1)

        probe = scores(np.zeros((1,) + tuple(shape), dtype))
        meta["binary"] = opts["binary"]
    else:
        _refuse_one_score(spec, tuple(probe.shape))
    if probe.ndim != 2:
        raise ModelError(f"model {spec}: scores must be (batch, classes), got shape {list(probe.shape)}")
    classes = classes or int(probe.shape[1])
    if zipmap:  # skl2onnx's ZipMap is keyed by the estimator's classes_, in the same sorted order
        meta.update(_class_names(np.asarray(keys)))
    elif threshold is None and (labels := _onnx_class_labels(path)) is not None and len(labels) == classes:
        meta.update(_class_names(np.asarray(labels)))
    if threshold is None and not _labels_follow_scores(sess, inp.name, out_index, zipmap, keys, shape, dtype, rng,
                                                       fixed, meta.get("class_names")):
        # e.g. a stacking ensemble: its classifier nodes count 0..C-1 and a later node maps
        # them to the labels, so neither the nodes nor the column order says which is which
        meta.pop("class_names", None)
        meta["class_labels_unknown"] = True

    def predict(batch: np.ndarray) -> np.ndarray:  # scores: Model.classes checks them, then takes argmax
        return scores(batch)

    meta.update({"format": "onnx", "onnx_output": sess.get_outputs()[out_index].name,
                 "onnx_threads": sess.get_session_options().intra_op_num_threads})
    if fixed is not None:
        meta["onnx_fixed_batch"] = fixed
    return Model(spec=spec, input_shape=tuple(shape), num_classes=classes, sha256=sha256_file(path),
                 value_range=rng, _predict_fn=predict, _scores_fn=scores, meta=meta)


class UntrustedTypes(ModelError):
    """A skops file with types nobody trusted; the message names them and the key to set."""

    def __init__(self, spec: str, types: list[str], key: str = "models.NAME.trusted_types"):
        self.spec, self.types = spec, list(types)
        super().__init__(f"model {spec}: skops file contains untrusted types {self.types}; refusing to load "
                         f"(if you have reviewed them, list them under {key})")


# Exactly the types scikit-learn's tree ensembles add to what skops trusts by default
# (DecisionTree, RandomForest, ExtraTrees, GradientBoosting, HistGradientBoosting
# classifiers, and Pipelines of them): their fitted tree structures.
TREE_TYPES = (
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)


def _sklearn_call(method, batch: np.ndarray):
    """``method`` (an estimator's predict / predict_proba) on ``batch`` as one C-contiguous
    float32 (n, features) array, without scikit-learn's per-call re-validation.

    Every batch reaching a model here was built by riskpipe: inputs checked finite and in
    shape at the edge (riskpipe.models.validate), noise added by the certifier, so
    ``assume_finite`` (no NaN/inf scan) and ``skip_parameter_validation`` drop work that can
    find nothing; the output is still checked (riskpipe.models.output). float32 C order is
    what the tree predictors read without a copy. Fitted on named columns and fed a plain
    array is expected here, so that warning is silenced for the call only."""

    x = np.ascontiguousarray(batch, dtype=np.float32).reshape(len(batch), -1)
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        return method(x)


def _forest_proba(est):
    """A random forest's / extra-trees' ``predict_proba`` without joblib, or None for any
    other estimator, a subclass included (it may override ``predict`` / ``predict_proba``:
    its own code then runs, through ``est.predict``).

    scikit-learn dispatches every tree of a forest through joblib, which re-applies its
    config and warning filters per tree: on a 200-tree forest that costs more than the
    trees themselves. This sums the same per-tree ``predict_proba(X, check_input=False)``
    in the same (estimator) order into the same float64 array and divides by the number of
    trees, exactly as ``ForestClassifier.predict_proba`` does with one job, so the result
    is the same bits (and deterministic whatever ``n_jobs`` the file was saved with)."""

    if type(est) not in (RandomForestClassifier, ExtraTreesClassifier) or est.n_outputs_ != 1 \
            or any(type(t) not in (DecisionTreeClassifier, ExtraTreeClassifier) for t in est.estimators_):
        return None  # a subclass (even one keeping the name) predicts with its own code: est.predict
    trees, k = list(est.estimators_), int(est.n_classes_)

    def proba(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), k), dtype=np.float64)
        for tree in trees:
            out += tree.predict_proba(x, check_input=False)
        out /= len(trees)
        return out

    return proba


def _load_skops(spec: str, path: Path, opts, trusted_types=()) -> Model:
    # lazy: skops.io imports all of scikit-learn to list the types it trusts (~2 s), for .skops models only
    import skops.io as sio

    trusted = [*TREE_TYPES, *trusted_types]
    try:
        untrusted = [t for t in sio.get_untrusted_types(file=str(path)) if t not in trusted]
    except Exception as e:  # noqa: BLE001 - skops raises several types for a file that is not its format
        raise ModelError(f"model {spec}: not a skops file ({type(e).__name__})") from None
    if untrusted:
        raise UntrustedTypes(spec, untrusted)
    est = sio.load(str(path), trusted=trusted)
    try:  # before anything calls the estimator: its predict walks the nodes unchecked
        _trees.check_loaded_trees(est)
    except _trees.MalformedTree as e:
        raise ModelError(f"model {spec}: {e}") from None
    n_features = getattr(est, "n_features_in_", None)
    shape, classes, rng = _shape_opts(opts, spec, (n_features,) if n_features else None)
    if (why := _multi_output(est, shape)) is not None:
        raise ModelError(f"model {spec}: multi-output models are not supported ({why}); riskpipe certifies one "
                         "class per input")
    classes = classes or len(getattr(est, "classes_", [])) or None
    if classes is None:
        raise ModelError(f"model {spec}: number of classes unknown; add ?classes=N")
    classes_ = np.asarray(getattr(est, "classes_", np.arange(classes)))

    forest = _forest_proba(est)
    if forest is not None:  # predict is classes_[argmax(predict_proba)]: the index is the argmax
        def predict(batch: np.ndarray) -> np.ndarray | BadOutput:
            return _sklearn_call(forest, batch).argmax(axis=1)
    else:
        def predict(batch: np.ndarray) -> np.ndarray | BadOutput:
            return _class_index(classes_, _sklearn_call(est.predict, batch))

    proba = None
    if forest is not None or hasattr(est, "predict_proba"):
        def proba(batch: np.ndarray) -> np.ndarray:
            return _sklearn_call(forest or est.predict_proba, batch)

    model = Model(spec=spec, input_shape=tuple(shape), num_classes=classes, sha256=sha256_file(path),
                  value_range=rng, _predict_fn=predict, _scores_fn=proba,
                  meta={"format": "skops", **_feature_names(est), **_class_names(classes_)})
    return _attach_trees(model, lambda: _trees.sklearn_ensemble(est))


def _attach_trees(model: Model, extract) -> Model:
    """``model.trees`` from ``extract()`` when the trees agree with the model's predict;
    otherwise the reason goes to ``meta['trees_error']`` (the ``trees`` certificate names it).
    Malformed node arrays (a cycle, a child or split feature out of range: a crafted file)
    refuse the model itself: its own predict would loop for ever or read beyond the input."""
    try:
        ens = extract()
        _trees.check_agreement(ens, model._predict_fn, model.num_classes)
        if ens.n_features != model.input_dim:
            raise _trees.TreeError(f"trees use {ens.n_features} features, the input has {model.input_dim}")
    except _trees.MalformedTree as e:
        raise ModelError(f"model {model.spec}: {e}") from None
    except _trees.TreeError as e:
        model.meta["trees_error"] = str(e)
        return model
    except Exception as e:  # noqa: BLE001 - an estimator's state riskpipe did not foresee: refused, one line
        raise ModelError(f"model {model.spec}: reading its trees failed ({type(e).__name__}: {one_line(e, 200)})") \
            from None
    model.trees = ens
    model.meta["trees"] = {"source": ens.source, "trees": ens.n_trees, "nodes": int(len(ens.feature))}
    return model


# suffixes a booster's native file may have: told apart from other files of the name by content
_LIGHTGBM_SUFFIXES = (".txt", ".lgb", ".model")
_BOOSTER_SUFFIXES = (".json", *_LIGHTGBM_SUFFIXES)


def _booster_format(path: Path, opts) -> str | None:
    """``xgboost`` / ``lightgbm`` for a booster's native file, else None. ``?format=`` decides;
    otherwise .ubj is XGBoost, a .json with a ``learner`` is XGBoost, and a text file that
    starts with LightGBM's ``tree`` header is LightGBM."""
    fmt = opts.get("format")
    if fmt is not None:
        if fmt not in ("xgboost", "lightgbm"):
            raise ModelError(f"model {path}: format must be xgboost or lightgbm, got {fmt!r}")
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".ubj":
        return "xgboost"
    with open(path, "rb") as f:
        head = f.read(4096)
    if suffix == ".json" and b'"learner"' in head:
        return "xgboost"
    if suffix in _LIGHTGBM_SUFFIXES and head.startswith(b"tree\n"):
        return "lightgbm"
    return None


def _load_booster(spec: str, path: Path, fmt: str, opts) -> Model:
    """An XGBoost (JSON/UBJ) or LightGBM (text) booster from its native file; its trees
    are read through the library's own model dump, and its margins classify."""
    try:
        lib = importlib.import_module("xgboost" if fmt == "xgboost" else "lightgbm")
    except ImportError:
        raise ModelError(f"model {spec}: {fmt} is not installed (pip install 'riskpipe[trees]')") from None
    try:
        if fmt == "xgboost":
            booster = lib.Booster(model_file=str(path))
            booster.set_param({"nthread": 1})
            ens, classes = _trees.xgboost_ensemble(booster)
            margin = _trees.xgboost_margin
        else:
            booster = lib.Booster(model_file=str(path))
            ens, classes = _trees.lightgbm_ensemble(booster)
            margin = _trees.lightgbm_margin
    except _trees.TreeError as e:
        raise ModelError(f"model {spec}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the libraries raise their own error types for a bad file
        raise ModelError(f"model {spec}: not a {fmt} model file ({type(e).__name__}: {one_line(e, 200)})") from None
    shape, opt_classes, rng = _shape_opts(opts, spec, (ens.n_features,))
    if opt_classes not in (None, classes):
        raise ModelError(f"model {spec}: ?classes={opt_classes}, the booster has {classes}")

    def predict(batch: np.ndarray) -> np.ndarray:
        return margin(booster, np.asarray(batch).reshape(len(batch), -1), classes).argmax(axis=1)

    def scores(batch: np.ndarray) -> np.ndarray:
        return margin(booster, np.asarray(batch).reshape(len(batch), -1), classes)

    model = Model(spec=spec, input_shape=tuple(shape), num_classes=classes, sha256=sha256_file(path),
                  value_range=rng, _predict_fn=predict, _scores_fn=scores, meta={"format": fmt})
    model = _attach_trees(model, lambda: ens)
    if model.trees is None:
        raise ModelError(f"model {spec}: {model.meta['trees_error']}")
    return model


def _feature_names(est) -> dict:
    """``{"feature_names": [...]}`` when the estimator was fitted on named columns."""
    names = getattr(est, "feature_names_in_", None)
    return {"feature_names": [str(n) for n in names]} if names is not None else {}


def _multi_output(est, shape) -> str | None:
    """Why ``est`` (or a Pipeline's final step) is a multi-output model, else None: it says
    so (``n_outputs_`` > 1, one ``classes_`` array per output), or its ``predict`` gives
    more than one label per input on a probe input. A scikit-learn ``predict`` never
    returns class scores, so a 2-D result is one label (or value) per output, and taking
    its argmax as the class would certify a model that has no single class."""
    final = est.steps[-1][1] if hasattr(est, "steps") and est.steps else est
    outputs = getattr(final, "n_outputs_", 1)
    if isinstance(outputs, int | np.integer) and outputs > 1:
        return f"{type(final).__name__} has {int(outputs)} outputs"
    if isinstance(getattr(final, "classes_", None), list):
        return f"{type(final).__name__} has one classes_ array per output"
    try:
        out = np.asarray(_sklearn_call(est.predict, np.zeros((1, *shape), dtype=np.float32)))
    except Exception:  # noqa: BLE001 - the start-up forward check reports a predict that raises
        return None
    if out.ndim > 1:
        return f"predict gives shape {list(out.shape)} for one input"
    return None


def _class_index(classes_: np.ndarray, labels) -> np.ndarray | BadOutput:
    """The index in ``classes_`` of each label ``predict`` gave, and -1 for a label that is
    none of them (a regressor's 0.3 with ``?classes=2``): the output check then faults that
    row (riskpipe.models.output) rather than read it as the class it would sort beside.
    A 2-D result is a multi-output model's one label per output, never class scores (a
    scikit-learn predict gives none): the whole batch is faulted, not read as logits."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        return BadOutput(f"predict gave shape {tuple(labels.shape)}, one label per output of a multi-output "
                         "model, not one class per input")
    idx = np.searchsorted(classes_, labels)
    hit = idx < len(classes_)
    hit[hit] = classes_[idx[hit]] == labels[hit]
    return np.where(hit, idx, -1)


def _class_names(classes_: np.ndarray) -> dict:
    """``{"class_names": [...]}`` when an estimator's classes are not just 0..K-1 (strings
    such as ``"fraud"``, or other integers): class i is ``classes_[i]``, in the sorted order
    scikit-learn keeps them in, which need not be the order a user would write them in."""
    if classes_.dtype.kind in "iu" and np.array_equal(classes_, np.arange(len(classes_))):
        return {}
    return {"class_names": [str(c) for c in classes_]}


def _is_factory(base: str) -> bool:
    """``package.module:factory[@weights]`` (a dotted import path, not a file)."""
    target = base.split("@", 1)[0]
    mod, sep, attr = target.partition(":")
    return bool(sep) and attr.isidentifier() and all(p.isidentifier() for p in mod.split("."))


def resolve_spec(spec: str, base: Path) -> str:
    """``spec`` with a relative model file (or ``@weights`` file) made relative to
    ``base``, the directory of the config file that names it."""
    head, q, opts = str(spec).partition("?")
    if head.startswith("demo:"):
        return spec
    if _is_factory(head):
        target, at, weights = head.partition("@")
        if at and weights and not Path(weights).is_absolute():
            head = f"{target}@{base / weights}"
    elif head and not Path(head).is_absolute():
        head = str(base / head)
    return head + q + opts


def relative_spec(spec: str, base: Path) -> str:
    """The inverse of ``resolve_spec``: ``spec`` as a config in directory ``base`` names it, its
    model file (or a factory's ``@weights`` file), as seen from here, made relative to ``base``.
    A spec naming no file here (``demo:``, a factory without weights) is returned as it is."""
    head, q, opts = str(spec).partition("?")
    if head.startswith("demo:"):
        return spec
    if _is_factory(head):
        target, at, weights = head.partition("@")
        if at and Path(weights).is_file():
            head = f"{target}@{os.path.relpath(Path(weights).resolve(), base.resolve())}"
    elif Path(head).is_file():
        head = os.path.relpath(Path(head).resolve(), base.resolve())
    return head + q + opts


def load_model_for(spec: str, sample_shape, device: str = "cpu", trusted_types=()) -> Model:
    """``load_model``, with the input shape taken from the inputs at hand (``sample_shape``:
    one input's shape) when the file records none (a plain TorchScript file): the model's
    spec then carries ``?shape=...``. Every command that has inputs loads models this way
    (init, certify, compare, replay, the stage with a reference set)."""
    try:
        return load_model(spec, device=device, trusted_types=trusted_types)
    except ShapeUnknown:
        if sample_shape is None or not len(sample_shape):
            raise
    shape = ",".join(str(int(d)) for d in sample_shape)
    return load_model(f"{spec}{'&' if '?' in spec else '?'}shape={shape}", device=device, trusted_types=trusted_types)


def device_problem(device: str) -> str | None:
    """Why this process cannot run models on ``device`` (``'NAME': reason``), else None: a
    name torch does not know, CUDA or MPS that this torch build or machine lacks, a CUDA
    index beyond the devices present (torch says so only at the first tensor moved, with a
    RuntimeError or an AssertionError)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"{device!r}: not a torch device (cpu, cuda, cuda:N, mps)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return (f"{device!r}: CUDA is not available here (torch {torch.__version__}"
                    f"{', built without CUDA' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return f"{device!r}: MPS is not available here"
    elif dev.type not in ("cpu", "cuda", "mps"):
        return f"{device!r}: riskpipe runs models on cpu, cuda or mps"
    return None


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or ModelError ``device NAME: reason`` (``device_problem``)."""
    if (why := device_problem(device)) is not None:
        raise ModelError(f"device {why}")
    return torch.device(device)


def load_model(spec: str, device: str = "cpu", trusted_types=()) -> Model:
    """Load a model from ``spec`` (see module docstring); raises ModelError with the reason.
    ``trusted_types`` (skops only) are types trusted beyond the tree ensembles' own."""
    check_device(device)
    base, opts = _options(str(spec))
    if base.startswith("demo:"):
        model = _load_demo(spec, base[5:], opts)
    elif _is_factory(base):
        model = _load_factory(spec, base, opts)
    else:
        path = Path(base)
        if not path.is_file():
            raise ModelError(f"model {spec}: file not found")
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            model = _load_onnx(spec, path, opts)
        elif suffix == ".skops":
            model = _load_skops(spec, path, opts, tuple(trusted_types or ()))
        elif (fmt := _booster_format(path, opts)) is not None:
            model = _load_booster(spec, path, fmt, opts)
        elif suffix in (".pt", ".ts", ".pth", ".torchscript"):
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"model {spec}: not a TorchScript file ({type(e).__name__})") from None
            model = _torch_model(spec, module, opts, sha256_file(path), getattr(module, "input_shape", None))
        elif suffix in _BOOSTER_SUFFIXES:  # a suffix boosters use, but the content is not one
            raise ModelError(f"model {spec}: not a booster file: a {suffix} model is read as XGBoost JSON (with a "
                             "\"learner\" member) or LightGBM text (starting with \"tree\"), and this is neither; "
                             "if it is one, name it with ?format=xgboost or ?format=lightgbm")
        else:
            raise ModelError(f"model {spec}: unknown format {suffix!r} (use .pt TorchScript, .onnx, .skops, "
                             "an XGBoost .json/.ubj or LightGBM .txt booster, module:factory@weights or demo:NAME)")
    if "format" in opts and model.meta.get("format") != opts["format"]:
        raise ModelError(f"model {spec}: ?format= names a booster's format (xgboost, lightgbm); this model was read "
                         f"as {model.meta.get('format') or 'a torch module'}")
    if "output" in opts and model.meta.get("format") != "onnx":
        raise ModelError(f"model {spec}: ?output= names an ONNX model's score output; this is not an ONNX model")
    if "sigma" in opts and not base.startswith("demo:"):
        raise ModelError(f"model {spec}: ?sigma= is a demo model's option")
    if "binary" in opts and model.meta.get("binary") != opts["binary"]:
        raise ModelError(f"model {spec}: ?binary= reads a torch or ONNX model with one output; this model gives "
                         f"scores for each of its {model.num_classes} classes")
    return model.to(device)
