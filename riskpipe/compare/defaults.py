"""What ``compare`` runs when not told otherwise: families, models and epsilon grids.

Kept apart from the runner (which imports torch) so the command's options can show
them without loading a model stack."""

from riskpipe.certify.families import FAMILIES

# Every family whose registry entry says so (not those that cannot speak about the default torch models).
DEFAULT_METHODS = tuple(name for name, f in FAMILIES.items() if f.compare_default)
DEFAULT_MODELS = ("demo:digits", "demo:digits-ibp", "demo:digits-lipschitz")
DEFAULT_GRID = {"l2": (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5), "linf": (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)}
