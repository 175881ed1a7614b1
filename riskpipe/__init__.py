"""riskpipe: robustness certificates, risk policies and human review for ML inference streams."""

__version__ = "0.1.0"
