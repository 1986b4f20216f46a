"""The per-peer hourly token quota (`mesh/split/quota.py`) and its policy field."""

from __future__ import annotations

import pytest
from shoal.mesh.node.config import ConfigError
from shoal.mesh.split.policy import PolicyConfig
from shoal.mesh.split.quota import WINDOW_S, PeerQuota


def test_a_peer_past_its_share_is_refused_until_its_work_leaves_the_hour() -> None:
    now = [1000.0]
    limit = [0]
    quota = PeerQuota(lambda: limit[0], clock=lambda: now[0])
    quota.record("pa", 60)
    assert quota.refusal("pa") is None  # 0: no quota
    limit[0] = 100
    assert quota.refusal("pa") is None and quota.used("pa") == 60
    now[0] += 10
    quota.record("pa", 40)
    quota.record("pb", 5)
    refusal = quota.refusal("pa")
    assert refusal is not None and "100 of its 100 tokens" in refusal
    assert quota.refusal("pb") is None  # per peer
    assert quota.retry_after_s("pa") == pytest.approx(WINDOW_S - 10)
    now[0] += WINDOW_S - 5  # the first 60 tokens left the window
    assert quota.used("pa") == 40 and quota.refusal("pa") is None
    now[0] += 10
    assert quota.used("pa") == 0


@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_the_policy_field_is_checked(value) -> None:
    with pytest.raises((ValueError, ConfigError)):
        PolicyConfig().updated({"max_tokens_per_peer_per_hour": value})
    assert PolicyConfig().updated({"max_tokens_per_peer_per_hour": 500}).max_tokens_per_peer_per_hour == 500
