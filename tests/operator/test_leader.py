"""The leader election's pure decisions: expiry by our own clock, the records written, where the Lease lives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelfleet_operator.leader import (
    LeaseRecord,
    Observation,
    candidate_identity,
    claimed,
    held_by_other,
    lease_namespace,
    micro_time,
    observe,
    released,
)
from modelfleet_operator.settings import OperatorSettings

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def record(holder: str = "a_1", renew: datetime = NOW, duration: int = 15, transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder, duration, micro_time(NOW), micro_time(renew), transitions)


def test_micro_time_is_the_api_servers_format() -> None:
    assert micro_time(NOW) == "2025-03-01T12:00:00.123456Z"
    assert micro_time(NOW.astimezone(UTC).replace(tzinfo=None).astimezone()) == "2025-03-01T12:00:00.123456Z"


def test_a_record_is_aged_from_when_we_first_saw_it_not_from_its_renew_time() -> None:
    first = observe(None, record(), now=100.0)
    assert first.at == 100.0
    assert observe(first, record(), now=107.0) is first  # unchanged: the age keeps counting
    renewed = observe(first, record(renew=NOW + timedelta(seconds=2)), now=108.0)
    assert renewed.at == 108.0  # changed: a fresh observation


@pytest.mark.parametrize("skew", [timedelta(hours=-1), timedelta(0), timedelta(hours=1)])
def test_a_leaders_skewed_clock_neither_expires_nor_prolongs_its_lease(skew: timedelta) -> None:
    # The leader's renewTime is an hour off our clock either way: only what we observe counts.
    seen = observe(None, record(renew=NOW + skew), now=1000.0)
    assert held_by_other(seen, "b_2", now=1000.0, default_duration=15)
    assert held_by_other(seen, "b_2", now=1014.9, default_duration=15)
    assert not held_by_other(seen, "b_2", now=1015.0, default_duration=15)


def test_a_lease_that_keeps_changing_never_expires() -> None:
    seen = observe(None, record(), now=0.0)
    for tick in range(1, 50):
        seen = observe(seen, record(renew=NOW + timedelta(seconds=2 * tick)), now=2.0 * tick)
        assert held_by_other(seen, "b_2", now=2.0 * tick + 14, default_duration=15)


def test_the_records_own_duration_counts_and_ours_only_when_it_has_none() -> None:
    seen = Observation(record(duration=60), at=0.0)
    assert held_by_other(seen, "b_2", now=59.0, default_duration=15)
    unset = Observation(record(duration=0), at=0.0)
    assert not held_by_other(unset, "b_2", now=15.0, default_duration=15)


def test_a_released_or_own_lease_is_never_held_by_another() -> None:
    assert not held_by_other(Observation(record(holder=""), at=0.0), "b_2", now=1.0, default_duration=15)
    assert not held_by_other(Observation(record(holder="b_2"), at=0.0), "b_2", now=1.0, default_duration=15)


def test_renewing_keeps_the_acquire_time_and_the_transition_count() -> None:
    mine = record(holder="a_1", transitions=3)
    later = NOW + timedelta(seconds=4)
    renewed = claimed(mine, "a_1", 15, later)
    assert renewed.holder == "a_1"
    assert renewed.acquire_time == mine.acquire_time
    assert renewed.renew_time == micro_time(later)
    assert renewed.transitions == 3


def test_taking_over_counts_a_transition_and_starts_a_new_acquire_time() -> None:
    later = NOW + timedelta(seconds=20)
    taken = claimed(record(holder="a_1", transitions=3), "b_2", 15, later)
    assert (taken.holder, taken.transitions, taken.lease_duration_seconds) == ("b_2", 4, 15)
    assert taken.acquire_time == taken.renew_time == micro_time(later)
    assert claimed(None, "b_2", 15, later).transitions == 0  # the first holder ever
    assert claimed(released(taken, later), "a_1", 15, later).transitions == 5


def test_releasing_clears_the_holder_and_keeps_the_count() -> None:
    gone = released(record(holder="a_1", transitions=7), NOW)
    assert gone.holder == ""
    assert gone.transitions == 7
    assert gone.lease_duration_seconds == 1


def test_a_record_survives_the_lease_spec_round_trip() -> None:
    r = record(holder="pod-x_ab12cd", transitions=2)
    spec = r.to_spec()
    assert spec["holderIdentity"] == "pod-x_ab12cd"
    assert spec["leaseTransitions"] == 2
    assert LeaseRecord.from_spec(spec) == r
    assert LeaseRecord.from_spec(None) == LeaseRecord()
    assert LeaseRecord.from_spec({"holderIdentity": None}).holder == ""


def test_the_lease_namespace_is_the_pods_then_the_service_accounts_then_the_setting(tmp_path: Path) -> None:
    account = tmp_path / "namespace"
    account.write_text("from-account\n")
    assert lease_namespace({"POD_NAMESPACE": "from-env"}, "fallback", account) == "from-env"
    assert lease_namespace({}, "fallback", account) == "from-account"
    assert lease_namespace({"POD_NAMESPACE": ""}, "fallback", tmp_path / "missing") == "fallback"


def test_the_identity_is_the_pod_name_or_hostname_with_a_suffix() -> None:
    assert candidate_identity({"POD_NAME": "modelfleet-7d9-abcde"}, "host", "a1b2c3") == "modelfleet-7d9-abcde_a1b2c3"
    assert candidate_identity({}, "host", "a1b2c3") == "host_a1b2c3"


def test_the_timing_defaults_are_client_gos_and_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = OperatorSettings()
    assert (
        s.leader_election_lease_duration_seconds,
        s.leader_election_renew_deadline_seconds,
        s.leader_election_retry_period_seconds,
    ) == (15, 10, 2)
    monkeypatch.setenv("MODELFLEET_OPERATOR_LEADER_ELECTION_LEASE_DURATION_SECONDS", "30")
    monkeypatch.setenv("MODELFLEET_OPERATOR_LEADER_ELECTION_LEASE_NAME", "other")
    s = OperatorSettings()
    assert (s.leader_election_lease_duration_seconds, s.leader_election_lease_name) == (30, "other")


@pytest.mark.parametrize(
    ("duration", "deadline", "retry"),
    [(10, 10, 2), (15, 16, 2), (15, 2.4, 2)],
)
def test_timing_where_the_leader_could_outlive_its_lease_is_refused(
    duration: int, deadline: float, retry: float
) -> None:
    with pytest.raises(ValidationError, match="leader_election"):
        OperatorSettings(
            leader_election_lease_duration_seconds=duration,
            leader_election_renew_deadline_seconds=deadline,
            leader_election_retry_period_seconds=retry,
        )
