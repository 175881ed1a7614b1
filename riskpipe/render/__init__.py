"""The one rendering helper the report, the evaluation, the compare card and the review
console share: a Jinja environment factory (``templating``), matplotlib figures as
deterministic PNG (``figures``), and pictures or tables of any model's inputs (``inputs``).
"""

from riskpipe.render.figures import b64, data_uri, png, pyplot
from riskpipe.render.inputs import InputView, ModelInfo, class_name, entry_info, input_view, model_info, record_view
from riskpipe.render.templating import environment, fmt, pct

__all__ = ["InputView", "ModelInfo", "b64", "class_name", "data_uri", "entry_info", "environment", "fmt", "input_view",
           "model_info", "pct", "png", "pyplot", "record_view"]
