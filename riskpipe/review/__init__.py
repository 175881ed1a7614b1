"""Human review console: the reviewer's side of the review queue, and the verdict feedback loop.

``riskpipe review`` serves it; ``serve_background`` runs it in a thread (the demo, tests).
"""

from riskpipe.review.app import create_app
from riskpipe.review.server import ConsoleServer, serve_background
from riskpipe.review.settings import Credentials, ReviewSettings, SettingsError, resolve_settings

__all__ = ["ConsoleServer", "Credentials", "ReviewSettings", "SettingsError", "create_app", "resolve_settings",
           "serve_background"]
