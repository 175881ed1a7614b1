"""The secret key of the smoothing noise seeds (``noise_key_file``, ``RISKPIPE_NOISE_KEY``).

A smoothing certificate holds "with probability >= 1 - alpha over the noise" only if
the noise is not the sender's choice. The sender picks the event id, so a seed that
is a public function of it (as sha256(id, policy) was) lets them try ids offline until
one draws noise that overstates the radius, then send that id. Seeds are
HMAC-SHA256(key, id, policy) instead (riskpipe.stream.pipeline.seed_for), with a key
the sender does not know. Each record holds its seed, so an auditor recomputes a
certificate (``ledger replay``) without the key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from riskpipe.app.config import ConfigError, StageConfig
from riskpipe.redaction import register_secret
from riskpipe.secret_file import read_secret_file, weak_secret
from riskpipe.stream.pipeline import MIN_NOISE_KEY_BYTES

NOISE_KEY_ENV = "RISKPIPE_NOISE_KEY"


@dataclass(frozen=True, repr=False)
class NoiseKey:
    """The key and where it came from (for the start-up line; the key is never shown)."""

    key: bytes
    source: str

    def __repr__(self) -> str:
        return f"NoiseKey(source={self.source!r})"


def resolve_noise_key(config: StageConfig, env: Mapping[str, str] = os.environ) -> NoiseKey:
    """``RISKPIPE_NOISE_KEY``, else the config's ``noise_key_file``, else a random key of this
    process. Set but empty, short, an example's placeholder or of few distinct characters:
    ConfigError naming the variable or the file (riskpipe.secret_file.weak_secret)."""
    if NOISE_KEY_ENV in env:
        text, source = env[NOISE_KEY_ENV].strip(), NOISE_KEY_ENV  # as a secret file's line is
        register_secret(text)
    elif config.noise_key_file is not None:
        text = read_secret_file(config.noise_key_file, "noise_key_file", ConfigError)
        source = f"noise_key_file {config.noise_key_file}"
    else:
        return NoiseKey(secrets.token_bytes(MIN_NOISE_KEY_BYTES), "a random key of this process")
    if (why := weak_secret(text, MIN_NOISE_KEY_BYTES)) is not None:
        raise ConfigError(f"{source}: the noise key {why}")
    return NoiseKey(text.encode("utf-8"), source)


def seeded_noise_key(seed: int, what: str) -> NoiseKey:
    """A key derived from a public seed, for runs that must repeat from their ``--seed``
    (``riskpipe evaluate``, ``riskpipe init``'s trial); never for a stage senders reach."""
    key = hashlib.sha256(f"riskpipe noise key\x00{what}\x00{int(seed)}".encode()).digest()
    return NoiseKey(key, f"{what}'s --seed {int(seed)} (public: a measurement, not a stage)")
