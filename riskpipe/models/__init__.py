"""Model loading: ``load_model(spec)`` returns a ``Model`` with its input spec."""

from riskpipe.models.base import Model, ModelError
from riskpipe.models.loader import load_model
from riskpipe.models.validate import InputError, check_inputs

__all__ = ["InputError", "Model", "ModelError", "check_inputs", "load_model"]
