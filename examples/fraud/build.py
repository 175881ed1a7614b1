"""Regenerate the fraud example: a HistGradientBoosting classifier on imbalanced transactions, saved with skops.

No real fraud data set ships offline, so ``make_classification`` draws one, seeded:
6,000 card transactions, 3 % fraud, 10 features, then mapped to raw units a fraud
model would see (amount in dollars, account age in days, distance in kilometres,
hour of day, counts ...) by a fixed positive affine map per feature, so features
differ in scale by four orders of magnitude. A fixed stratified split gives the
training rows and the reference set.

The estimator is ``HistGradientBoostingClassifier`` (class-weighted for the imbalance,
100 boosting iterations, at most 15 leaves per tree). skops refuses its fitted tree
type unless trusted: riskpipe trusts exactly the tree types scikit-learn's ensembles
need (``riskpipe.models.loader.TREE_TYPES``), so ``riskpipe`` loads it without a
``trusted_types`` entry. The stage certifies it with the deterministic ``trees``
certificate in standardized units (``scale: standardize``).

Writes, next to this file: ``model.skops`` and ``reference.npz`` (X float32 (N, 10)
raw units, y int64, feature_names). Seeded with one thread: a rerun gives the same
reference set and the same fitted trees.

    python examples/fraud/build.py      # a few seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0
N = 6000
FRAUD_RATE = 0.03
FEATURES = ["amount_usd", "account_age_days", "distance_from_home_km", "hour_of_day", "transactions_24h",
            "merchant_risk_score", "card_present_ratio", "failed_pins_7d", "days_since_last_txn",
            "avg_amount_30d_usd"]
# raw = offset + unit * standard-normal feature (positive units: the order of values is kept)
UNITS = np.array([120.0, 400.0, 35.0, 4.0, 3.0, 0.15, 0.2, 0.8, 6.0, 90.0], dtype=np.float32)
OFFSETS = np.array([250.0, 1500.0, 60.0, 13.0, 8.0, 0.5, 0.6, 1.5, 15.0, 300.0], dtype=np.float32)
LABELS = ["legitimate", "fraud"]


def load_data():
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    X, y = make_classification(N, len(FEATURES), n_informative=6, n_redundant=2, weights=[1 - FRAUD_RATE],
                               class_sep=1.2, flip_y=0.005, random_state=SEED)
    X = (OFFSETS + UNITS * X).astype(np.float32)
    Xtr, Xref, ytr, yref = train_test_split(X, y.astype(np.int64), test_size=0.25, stratify=y, random_state=SEED)
    return Xtr, ytr, Xref, yref


def train(Xtr: np.ndarray, ytr: np.ndarray):
    from sklearn.ensemble import HistGradientBoostingClassifier

    est = HistGradientBoostingClassifier(max_iter=100, max_leaf_nodes=15, learning_rate=0.1,
                                         class_weight="balanced", early_stopping=False, random_state=SEED)
    return est.fit(Xtr, ytr)


def main(out: Path = HERE) -> None:
    import skops.io as sio
    from sklearn.metrics import recall_score
    from threadpoolctl import threadpool_limits

    from riskpipe.models.loader import TREE_TYPES

    with threadpool_limits(limits=1):
        Xtr, ytr, Xref, yref = load_data()
        est = train(Xtr, ytr)
        pred = est.predict(Xref)
    # the names fitting on a pandas DataFrame would record (pandas is no dependency here)
    est.feature_names_in_ = np.asarray(FEATURES, dtype=object)
    sio.dump(est, out / "model.skops")
    untrusted = [t for t in sio.get_untrusted_types(file=str(out / "model.skops")) if t not in TREE_TYPES]
    assert not untrusted, f"riskpipe would refuse {untrusted}"
    np.savez_compressed(out / "reference.npz", X=Xref, y=yref, feature_names=np.array(FEATURES))
    print(f"model.skops, reference.npz ({len(Xref)} rows, {int(yref.sum())} fraud, {Xref.shape[1]} features) "
          f"written to {out}; reference accuracy {(pred == yref).mean():.3f}, fraud recall "
          f"{recall_score(yref, pred):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
