"""kafka-python's CRC-32C: the C extension is active, and a fallback is loud."""

from __future__ import annotations

import logging

from prometheus_client.parser import text_string_to_metric_families

from riskpipe.metrics import StageMetrics, expose
from riskpipe.stream.checksum import PURE_PYTHON, active_function, check_kafka_crc32c, implementation_of


def _info(metrics: StageMetrics) -> dict:
    for fam in text_string_to_metric_families(expose(metrics.registry).decode()):
        for s in fam.samples:
            if s.name == "riskpipe_kafka_crc32c_info":
                return s.labels
    return {}


def test_kafka_python_uses_the_c_extension() -> None:
    # crc32c is a dependency: kafka-python must have picked it up at import time
    impl = implementation_of(active_function())
    assert impl in ("crc32c-hardware", "crc32c-software"), impl


def test_active_function_computes_crc32c() -> None:
    # RFC 3720 B.4 check value for "123456789"
    assert active_function()(memoryview(b"123456789")) == 0xE3069283


def test_pure_python_fallback_is_detected_logged_and_exported(caplog) -> None:
    from kafka.record.util import crc32c_py

    m = StageMetrics()
    with caplog.at_level(logging.WARNING, logger="riskpipe.stream"):
        assert check_kafka_crc32c(m, fn=crc32c_py) == PURE_PYTHON
    assert any("pure Python" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert _info(m) == {"implementation": PURE_PYTHON}


def test_active_implementation_is_exported() -> None:
    m = StageMetrics()
    impl = check_kafka_crc32c(m)
    assert _info(m) == {"implementation": impl}
    assert impl != PURE_PYTHON
