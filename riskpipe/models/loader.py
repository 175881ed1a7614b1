"""``load_model(spec)``: one entry point for every model format riskpipe accepts.

Specs:
  ``demo:NAME``                     a demo model (``demo:digits``)
  ``PATH.pt`` / ``PATH.ts``          a TorchScript file
  ``PATH.onnx``                      an ONNX file (onnxruntime; smoothing only)
  ``module:factory@WEIGHTS``         ``factory()`` builds the nn.Module, weights loaded
                                     with ``torch.load(weights_only=True)``
  ``PATH.skops``                     a scikit-learn estimator saved with skops; only
                                     types skops reports as trusted are loaded
Options after ``?`` set the input spec where the file cannot carry it, e.g.
``model.onnx?shape=1,8,8&classes=10&range=0,1``.

Nothing here unpickles an untrusted file.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from riskpipe.models.base import Model, ModelError, ShapeUnknown, sha256_file, sha256_state_dict
from riskpipe.models.digits import INPUT_SHAPE, NUM_CLASSES


def _options(spec: str) -> tuple[str, dict[str, str]]:
    if "?" in spec:
        base, q = spec.split("?", 1)
        return base, dict(parse_qsl(q))
    return spec, {}


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
    return shape, classes, rng


def _probe_classes(module: torch.nn.Module, shape: tuple[int, ...], spec: str) -> int:
    with torch.inference_mode():
        out = module(torch.zeros((1,) + tuple(shape)))
    if out.ndim != 2:
        raise ModelError(f"model {spec}: output must be (batch, classes) logits, got shape {tuple(out.shape)}")
    return int(out.shape[1])


def _torch_model(spec: str, module: torch.nn.Module, opts, sha: str, default_shape=None) -> Model:
    module.eval()
    shape, classes, rng = _shape_opts(opts, spec, default_shape)
    classes = classes or _probe_classes(module, shape, spec)
    return Model(spec=spec, input_shape=tuple(shape), num_classes=classes, sha256=sha, value_range=rng, module=module)


def _load_demo(spec: str, name: str, opts) -> Model:
    from riskpipe.models import demo

    if name not in demo.DEMOS:
        raise ModelError(f"model {spec}: unknown demo model {name!r} (known: {', '.join(sorted(demo.DEMOS))})")
    sigma = float(opts["sigma"]) if "sigma" in opts else None
    module = demo.build_demo(name, sigma=sigma)
    recipe = demo.DEMOS[name][0]
    from riskpipe.models.digits import reference_file

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
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"model {spec}: factory {target!r} did not return an nn.Module")
    sha = None
    if weights:
        if not Path(weights).is_file():
            raise ModelError(f"model {spec}: weights file {weights!r} not found")
        try:
            state = torch.load(weights, weights_only=True, map_location="cpu")
            module.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad model file
            raise ModelError(f"model {spec}: cannot load weights ({type(e).__name__}: {e})") from None
    sha = sha256_state_dict(module)
    default_shape = getattr(module, "input_shape", None)
    return _torch_model(spec, module, opts, sha, default_shape)


def _load_onnx(spec: str, path: Path, opts) -> Model:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(f"model {spec}: onnxruntime is not installed (pip install 'riskpipe[onnx]')") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    file_shape = tuple(d for d in inp.shape[1:]) if all(isinstance(d, int) for d in inp.shape[1:]) else None
    shape, classes, rng = _shape_opts(opts, spec, file_shape)
    if classes is None:
        out = sess.run(None, {inp.name: np.zeros((1,) + tuple(shape), np.float32)})[0]
        classes = int(out.shape[1])

    def predict(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {inp.name: batch.astype(np.float32, copy=False)})[0].argmax(axis=1)

    return Model(spec=spec, input_shape=tuple(shape), num_classes=classes, sha256=sha256_file(path),
                 value_range=rng, _predict_fn=predict, meta={"format": "onnx"})


def _load_skops(spec: str, path: Path, opts) -> Model:
    import skops.io as sio

    untrusted = sio.get_untrusted_types(file=str(path))
    if untrusted:
        raise ModelError(f"model {spec}: skops file contains untrusted types {untrusted}; refusing to load")
    est = sio.load(str(path), trusted=[])
    n_features = getattr(est, "n_features_in_", None)
    shape, classes, rng = _shape_opts(opts, spec, (n_features,) if n_features else None)
    classes = classes or len(getattr(est, "classes_", [])) or None
    if classes is None:
        raise ModelError(f"model {spec}: number of classes unknown; add ?classes=N")
    classes_ = np.asarray(getattr(est, "classes_", np.arange(classes)))

    def predict(batch: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # fitted on named columns, fed plain arrays: expected here
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            pred = est.predict(batch.reshape(len(batch), -1))
        return np.searchsorted(classes_, pred)

    return Model(spec=spec, input_shape=tuple(shape), num_classes=classes, sha256=sha256_file(path),
                 value_range=rng, _predict_fn=predict, meta={"format": "skops", **_feature_names(est)})


def _feature_names(est) -> dict:
    """``{"feature_names": [...]}`` when the estimator was fitted on named columns."""
    names = getattr(est, "feature_names_in_", None)
    return {"feature_names": [str(n) for n in names]} if names is not None else {}


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


def load_model_for(spec: str, sample_shape, device: str = "cpu") -> Model:
    """``load_model``, with the input shape taken from the inputs at hand (``sample_shape``:
    one input's shape) when the file records none (a plain TorchScript file): the model's
    spec then carries ``?shape=...``. Every command that has inputs loads models this way
    (init, certify, compare, replay, the stage with a reference set)."""
    try:
        return load_model(spec, device=device)
    except ShapeUnknown:
        if sample_shape is None or not len(sample_shape):
            raise
    shape = ",".join(str(int(d)) for d in sample_shape)
    return load_model(f"{spec}{'&' if '?' in spec else '?'}shape={shape}", device=device)


def load_model(spec: str, device: str = "cpu") -> Model:
    """Load a model from ``spec`` (see module docstring); raises ModelError with the reason."""
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
            model = _load_skops(spec, path, opts)
        elif suffix in (".pt", ".ts", ".pth", ".torchscript"):
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"model {spec}: not a TorchScript file ({type(e).__name__})") from None
            model = _torch_model(spec, module, opts, sha256_file(path), getattr(module, "input_shape", None))
        else:
            raise ModelError(f"model {spec}: unknown format {suffix!r} (use .pt TorchScript, .onnx, .skops, module:factory@weights or demo:NAME)")
    return model.to(device)
