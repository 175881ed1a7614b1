"""Reviewed (trusted_types) subclasses of scikit-learn's forests with a tuned decision
threshold, a common fraud-model pattern: their predict is not the plain forest's argmax.
One keeps the base class's name, so only the module tells it apart."""

import numpy as np
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.ensemble import RandomForestClassifier as _RF


class ThresholdForest(_RF):
    """Class 1 when P(1) >= 0.2."""

    def predict(self, X):
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.2).astype(int)]


class ThresholdExtraTrees(ExtraTreesClassifier):
    def predict(self, X):
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.2).astype(int)]


class RandomForestClassifier(_RF):
    """The same tweak under the base class's name; predict_proba re-weighted to agree."""

    def predict(self, X):
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.2).astype(int)]

    def predict_proba(self, X):
        p = super().predict_proba(X)
        q = np.stack([p[:, 0] * 0.25, p[:, 1]], axis=1)
        return q / q.sum(axis=1, keepdims=True)
