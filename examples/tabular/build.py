"""Regenerate the tabular example: a scikit-learn MLP on the breast cancer data, saved with skops.

scikit-learn's bundled Wisconsin breast cancer set (569 tumours, 30 features in raw
units: millimetres, square millimetres, ratios; classes malignant / benign). A fixed
stratified split gives the training rows and the reference set. The stage smooths in
standardized units (``scale: standardize``: noise N(0, sigma^2 diag(s^2)), s the per-feature
standard deviation of the reference set), so the model is trained on copies of each
training row with exactly that noise added, at the sigma of ``policy.yaml``.

The estimator is ``StandardScaler`` + ``MLPClassifier(solver="lbfgs")``: every type in the
file is one skops trusts by default (the Adam solver would leave an optimizer object
skops refuses), so ``riskpipe`` loads it without ``trusted=`` overrides; the pipeline
carries the 30 feature names.

Writes, next to this file: ``model.skops`` and ``reference.npz`` (X float32 (N, 30) raw
units, y int64, feature_names). Seeded with one BLAS thread: a rerun gives the same
reference set and the same fitted weights (the .skops bytes differ: skops names the
arrays inside its zip by Python object id).

    python examples/tabular/build.py      # a few seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIGMA = 0.25  # must equal certifier.sigma in policy.yaml (standardized units)
SEED = 0
COPIES = 20  # noisy copies of each training row


def load_data():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    d = load_breast_cancer()
    Xtr, Xref, ytr, yref = train_test_split(d.data.astype(np.float32), d.target.astype(np.int64), test_size=0.3,
                                            stratify=d.target, random_state=SEED)
    return Xtr, ytr, Xref, yref, [str(n) for n in d.feature_names], [str(n) for n in d.target_names]


def train(Xtr: np.ndarray, ytr: np.ndarray, scale: np.ndarray):
    """StandardScaler + MLP on COPIES noisy copies of each row, noise N(0, SIGMA^2 diag(scale^2))."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(SEED)
    Xn = np.repeat(Xtr, COPIES, axis=0)
    Xn = Xn + SIGMA * scale * rng.standard_normal(Xn.shape).astype(np.float32)
    yn = np.repeat(ytr, COPIES)
    est = make_pipeline(StandardScaler(), MLPClassifier((32, 16), solver="lbfgs", alpha=1e-2, max_iter=500,
                                                        random_state=SEED))
    return est.fit(Xn, yn)


def main(out: Path = HERE) -> None:
    import skops.io as sio
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        Xtr, ytr, Xref, yref, features, labels = load_data()
        scale = Xref.std(axis=0)
        est = train(Xtr, ytr, scale)
        rng = np.random.default_rng(SEED + 1)
        clean = (est.predict(Xref) == yref).mean()
        noisy = (est.predict(Xref + SIGMA * scale * rng.standard_normal(Xref.shape).astype(np.float32)) == yref).mean()
    # the names fitting on a pandas DataFrame would record (pandas is no dependency here):
    # riskpipe reads them from the model for the review console and reports
    est[0].feature_names_in_ = np.asarray(features, dtype=object)
    sio.dump(est, out / "model.skops")
    untrusted = sio.get_untrusted_types(file=str(out / "model.skops"))
    assert not untrusted, f"skops would refuse {untrusted}"
    np.savez_compressed(out / "reference.npz", X=Xref, y=yref, feature_names=np.array(features))
    print(f"model.skops, reference.npz ({len(Xref)} rows, {Xref.shape[1]} features; classes {labels}) written to "
          f"{out}; reference accuracy clean {clean:.3f}, under N(0, ({SIGMA} s)^2) noise {noisy:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
