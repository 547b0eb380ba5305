"""Settings of one broker process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class BrokerConfig:
    """Everything a broker needs to start.

    ``grace_ms`` is the extra time sessions found in the store get to reconnect
    after a restart; ``None`` means one lease. ``metrics`` is the ``HOST:PORT``
    of the Prometheus endpoint, ``None`` for none. ``facts_max`` and
    ``facts_max_age_s`` bound the facts retained per repository.
    ``request_memory_s`` is how long the reply to a mutating request is
    kept for a retry with the same ``rid``. ``rate_per_s`` and
    ``rate_burst`` are each peer's token bucket (0: no limit).
    ``curve_secret`` (the broker's secret key file) with ``curve_allow`` (a
    directory of admitted client public keys) turns on CURVE; keys in
    ``curve_operators`` may force-release, as may the local user when
    ``local_operator``. ``cross_repo`` lets any admitted credential read
    every repository.
    """

    url: str
    data_dir: Path
    pub_url: str | None = None
    lease_ms: int = 5000
    grace_ms: int | None = None
    heartbeat_interval_ms: int = 1000
    max_batch: int = 256
    synchronous: str = "NORMAL"
    log_level: str = "info"
    log_json: bool | None = None
    metrics: str | None = None
    facts_max: int = 100_000
    facts_max_age_s: float = 30 * 86_400.0
    rate_per_s: float = 10_000.0
    request_memory_s: float = 600.0
    pub_hwm: int = 100_000
    rate_burst: int = 20_000
    curve_secret: Path | None = None
    curve_allow: Path | None = None
    curve_operators: Path | None = None
    local_operator: bool = True
    cross_repo: bool = False

    @property
    def grace_s(self) -> float:
        """The reconnect grace period in seconds."""
        grace = self.lease_ms if self.grace_ms is None else self.grace_ms
        return grace / 1000

    @property
    def db_path(self) -> Path:
        """The SQLite file of the broker's state."""
        return self.data_dir / "fleetbus.db"
