"""What ``compare`` runs when not told otherwise: families, models and epsilon grids.

Kept apart from the runner (which imports torch) so the command's options can show
them without loading a model stack."""

from riskpipe.certify.families import METHODS  # every family, one list (names only)

# The default models are torch networks, which the tree certificate cannot speak about:
# by default every family but ``trees`` runs (``--methods trees,smoothing`` for a tree ensemble).
DEFAULT_METHODS = tuple(m for m in METHODS if m != "trees")
DEFAULT_MODELS = ("demo:digits", "demo:digits-ibp", "demo:digits-lipschitz")
DEFAULT_GRID = {"l2": (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5), "linf": (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)}
