import numpy as np
import pytest
import torch

from riskpipe.models import InputError, ModelError, check_inputs, load_model
from riskpipe.models.demo import accuracy, digits_cnn


def test_demo_model_spec_and_accuracy(demo_model, digits_test):
    X, y = digits_test
    m = demo_model
    assert m.input_shape == (1, 8, 8) and m.num_classes == 10 and m.value_range == (0.0, 1.0)
    assert len(m.sha256) == 64 and m.module is not None and not m.module.training
    assert accuracy(m.module, X, y) >= 0.95
    assert accuracy(m.module, X, y, sigma=0.25) >= 0.9
    assert (m.predict(X[:10]) == m.module(torch.from_numpy(X[:10])).argmax(1).numpy()).all()


def test_demo_training_is_deterministic(tmp_path, monkeypatch):
    """Same recipe, two fresh caches: bit-identical weights (short recipe to stay fast)."""
    from riskpipe.models import demo
    from riskpipe.models.base import sha256_state_dict

    demo.register_demo(demo.Recipe("digits-short", epochs=2), lambda: digits_cnn(8), demo.train_noise)
    shas = []
    for sub in ("a", "b"):
        monkeypatch.setenv("RISKPIPE_CACHE_DIR", str(tmp_path / sub))
        shas.append(sha256_state_dict(demo.build_demo("digits-short")))
    assert shas[0] == shas[1]
    assert sha256_state_dict(demo.build_demo("digits-short")) == shas[1]  # read back from the cache file
    assert [p.suffix for p in (tmp_path / "b" / "models").iterdir()] == [".pt"]  # no temporary file left
    del demo.DEMOS["digits-short"]


def test_torchscript_and_factory_and_onnx(tmp_path, demo_model, digits_test):
    X, _ = digits_test
    ts = tmp_path / "m.pt"
    torch.jit.script(demo_model.module).save(str(ts))
    m1 = load_model(f"{ts}?shape=1,8,8")
    w = tmp_path / "w.pt"
    torch.save(demo_model.module.state_dict(), w)
    m2 = load_model(f"riskpipe.models.demo:digits_cnn@{w}?shape=1,8,8")
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(demo_model.module, torch.zeros(1, 1, 8, 8), str(onnx_path), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    m3 = load_model(str(onnx_path))
    ref = demo_model.predict(X[:50])
    for m in (m1, m2, m3):
        assert (m.predict(X[:50]) == ref).all()
        assert m.num_classes == 10
    assert m2.meta["weights_sha256"] == demo_model.sha256 and m2.meta["code_packages"] == ["riskpipe"]
    assert m2.sha256 != demo_model.sha256  # it covers the factory's code too (tests/test_factory_code.py)
    assert m3.module is None  # ONNX: smoothing only


@pytest.mark.parametrize("spec,msg", [
    ("demo:nope", "unknown demo model"),
    ("/nonexistent/model.pt", "file not found"),
    ("riskpipe.nope:factory", "cannot import factory"),
    ("riskpipe.models.demo:digits_cnn@/nonexistent.pt", "weights file"),
])
def test_bad_specs_name_the_reason(spec, msg):
    with pytest.raises(ModelError, match=msg):
        load_model(spec)


def test_a_file_with_a_booster_suffix_that_is_no_booster_says_so(tmp_path):
    """A .txt or .json that is neither LightGBM text nor XGBoost JSON was an "unknown format
    '.txt'" beside a list naming .txt as supported."""
    for name, text in (("model.txt", "x\n"), ("model.json", '{"a": 1}'), ("model.lgb", "")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ModelError, match=rf"not a booster file: a \{name[5:]} model is read as XGBoost JSON .*"
                                             r"\?format=xgboost or \?format=lightgbm"):
            load_model(str(tmp_path / name))
    (tmp_path / "model.bin").write_text("x")
    with pytest.raises(ModelError, match=r"unknown format '\.bin'"):
        load_model(str(tmp_path / "model.bin"))


def test_weights_only_refuses_pickled_objects(tmp_path):
    import pickle

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": object()}, f)
    with pytest.raises(ModelError, match="cannot load weights"):
        load_model(f"riskpipe.models.demo:digits_cnn@{evil}?shape=1,8,8")


def test_input_checks(demo_model):
    good = np.zeros((2, 1, 8, 8), np.float32)
    assert check_inputs(good, demo_model).shape == (2, 1, 8, 8)
    cases = [
        (np.zeros((2, 3, 3)), "wrong_shape"),
        (np.full((1, 1, 8, 8), np.nan), "non_finite"),
        (np.full((1, 1, 8, 8), 2.0), "out_of_range"),
        (np.array([["a"] * 64]), "wrong_dtype"),
    ]
    for arr, code in cases:
        with pytest.raises(InputError) as e:
            check_inputs(arr, demo_model)
        assert e.value.code == code


def test_architecture_size():
    n = sum(p.numel() for p in digits_cnn(8).parameters())
    assert 20_000 < n < 40_000


def _two_outputs(path):
    """An ONNX graph with an embedding (N, 8) and then the logits (N, 3): both float, rank 2."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["emb"]), helper.make_node("MatMul", ["emb", "W2"], ["logits"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w1 @ w2


def test_an_onnx_model_with_two_score_like_outputs_needs_output_named(tmp_path):
    """The first (N, C) float output was taken as the scores: an embedding before the
    logits made an 8-class 'classifier' that agreed with the model on 0 of 200 inputs.
    Now two candidates are refused, naming both and ?output=; named, the right one is read."""
    path = tmp_path / "two.onnx"
    w = _two_outputs(path)
    with pytest.raises(ModelError, match=r"2 outputs could hold the class scores \(emb, logits\); .*\?output=NAME"):
        load_model(str(path))
    model = load_model(f"{path}?output=logits")
    X = np.random.default_rng(1).random((200, 4)).astype(np.float32)
    assert model.num_classes == 3 and model.meta["onnx_output"] == "logits"
    np.testing.assert_array_equal(model.predict(X), (X @ w).argmax(1))
    with pytest.raises(ModelError, match=r"\?output=scores: the model has no such output \(outputs: emb"):
        load_model(f"{path}?output=scores")
    with pytest.raises(ModelError, match=r"\?format= names a booster's format .* read as onnx"):
        load_model(f"{path}?output=logits&format=lightgbm")


@pytest.mark.parametrize("options, message", [
    ("?rnage=0,1", r"unknown option \?rnage= \(options: \?shape=, \?classes=, \?range="),
    ("?range=0,1&range=0,255", r"option \?range= given twice"),
    ("?output=logits", r"\?output= names an ONNX model's score output; this is not an ONNX model"),
    ("?format=xgboost", r"not a xgboost model file \(XGBoostError: .*Check failed"),  # read as asked: not one
    ("?sigma=0.5", r"\?sigma= is a demo model's option"),
])
def test_a_spec_option_the_loader_would_not_read_is_refused(tmp_path, demo_model, options, message):
    """A misspelt option was ignored: ``?rnage=0,1`` loaded the model without its input range,
    so out-of-range inputs were certified and decided. Each is now a one-line ModelError."""
    path = tmp_path / "m.pt"
    torch.jit.script(demo_model.module).save(str(path))
    with pytest.raises(ModelError, match=message) as e:
        load_model(f"{path}{options}" if "shape" in options else f"{path}{options}&shape=1,8,8")
    assert "\n" not in str(e.value)
    assert load_model(f"{path}?shape=1,8,8&range=0,1").value_range == (0.0, 1.0)


def test_a_torchscript_error_is_named_once(tmp_path):
    """A TorchScript model's error ends in a line `RuntimeError: reason`, which the message
    prefixed with its type again: `forward pass raised RuntimeError: RuntimeError: The size...`."""
    import torch

    from riskpipe.models import ModelError, load_model

    class Centred(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(13))

        def forward(self, x):
            return torch.stack([(x - self.mean).sum(1), -(x - self.mean).sum(1)], 1)

    path = tmp_path / "m.pt"
    torch.jit.script(Centred()).save(str(path))
    with pytest.raises(ModelError) as e:
        load_model(f"{path}?shape=12")
    assert "forward pass raised RuntimeError: The size of tensor a (12)" in str(e.value), str(e.value)
