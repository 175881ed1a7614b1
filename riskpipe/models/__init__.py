"""Model loading: ``load_model(spec)`` returns a ``Model`` with its input spec."""

from riskpipe.models.base import Model, ModelError, ModelFault, ShapeUnknown
from riskpipe.models.loader import check_device, device_problem, load_model, load_model_for
from riskpipe.models.validate import InputError, check_inputs

__all__ = ["InputError", "Model", "ModelError", "ModelFault", "ShapeUnknown", "check_device", "check_inputs",
           "device_problem", "load_model", "load_model_for"]
