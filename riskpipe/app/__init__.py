"""The application floor: what turns the engine (riskpipe.stream) into a program.

``config`` is the validated config model of the whole application (read by the
runners and by review, report and compare), ``compose`` the composition root that
builds models, certifiers, contexts, Kafka clients, the ledger and metrics from one
config, and ``runner``/``offline`` run the stage (Kafka, workers, JSON-lines files).
The engine never imports this package; the floors are listed in
tests/test_architecture.py (``FLOORS``).
"""
