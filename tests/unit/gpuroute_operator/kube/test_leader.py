"""The leader-election rules (pure: both clocks passed in)."""

from __future__ import annotations

import datetime as dt

import pytest

from gpuroute_operator.kube.leader import (
    LEASE_DURATION_S,
    RENEW_DEADLINE_S,
    RENEW_PERIOD_S,
    RETRY_PERIOD_S,
    Action,
    LeaderElectionConfig,
    LeaseRecord,
    Observation,
    decide,
    observe,
    renew_overdue,
)

WALL = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
ME, OTHER = "replica-a", "replica-b"


def seen(holder: str, *, at: float = 100.0, duration: int = 3, transitions: int = 0, version: str = "1") -> Observation:
    return Observation(LeaseRecord(holder, duration, transitions, WALL, WALL), version, at)


def test_no_lease_is_created_with_me_as_holder() -> None:
    d = decide(None, identity=ME, leading=False, now=0.0, wall=WALL, lease_duration_s=3)
    assert d.action is Action.ACQUIRE
    assert d.record == LeaseRecord(ME, 3, 0, WALL, WALL)


def test_a_valid_lease_of_another_holder_makes_me_wait() -> None:
    obs = seen(OTHER, at=100.0)
    for now in (100.0, 101.0, 102.99):
        d = decide(obs, identity=ME, leading=False, now=now, wall=WALL, lease_duration_s=3)
        assert d.action is Action.WAIT and d.record is None


def test_expiry_is_measured_from_when_i_saw_the_record_not_its_renew_time() -> None:
    # renewTime is a day old by my clock (clock skew): still no takeover before the
    # record has stayed unchanged for the holder's lease duration on MY clock.
    old = LeaseRecord(OTHER, 3, 4, WALL - dt.timedelta(days=1), WALL - dt.timedelta(days=1))
    obs = Observation(old, "7", 50.0)
    assert decide(obs, identity=ME, leading=False, now=52.9, wall=WALL, lease_duration_s=3).action is Action.WAIT
    d = decide(obs, identity=ME, leading=False, now=53.0, wall=WALL, lease_duration_s=3)
    assert d.action is Action.ACQUIRE
    assert d.record == LeaseRecord(ME, 3, 5, WALL, WALL), "a takeover counts one transition"


def test_the_holders_own_duration_governs_expiry() -> None:
    obs = seen(OTHER, at=0.0, duration=15)
    assert decide(obs, identity=ME, leading=False, now=10.0, wall=WALL, lease_duration_s=3).action is Action.WAIT
    assert decide(obs, identity=ME, leading=False, now=15.0, wall=WALL, lease_duration_s=3).action is Action.ACQUIRE


def test_a_released_lease_is_taken_at_once() -> None:
    obs = seen("", at=100.0, duration=1, transitions=2)
    d = decide(obs, identity=ME, leading=False, now=100.0, wall=WALL, lease_duration_s=3)
    assert d.action is Action.ACQUIRE
    assert d.record == LeaseRecord(ME, 3, 3, WALL, WALL)


def test_the_leader_renews_keeping_acquire_time_and_transitions() -> None:
    acquired = WALL - dt.timedelta(minutes=5)
    obs = Observation(LeaseRecord(ME, 3, 2, acquired, acquired), "9", 0.0)
    d = decide(obs, identity=ME, leading=True, now=1000.0, wall=WALL, lease_duration_s=3)
    assert d.action is Action.RENEW
    assert d.record == LeaseRecord(ME, 3, 2, acquired, WALL)


def test_a_restarted_process_with_the_same_identity_takes_its_lease_back_at_once() -> None:
    obs = seen(ME, at=100.0, transitions=2)
    d = decide(obs, identity=ME, leading=False, now=100.0, wall=WALL, lease_duration_s=3)
    assert d.action is Action.ACQUIRE
    assert d.record is not None and d.record.holder == ME and d.record.transitions == 2


def test_a_leader_that_finds_another_holder_has_lost() -> None:
    d = decide(seen(OTHER), identity=ME, leading=True, now=100.0, wall=WALL, lease_duration_s=3)
    assert d.action is Action.LOST and OTHER in d.reason
    # Released by someone else while I thought I led: also lost, never silently re-taken.
    assert decide(seen(""), identity=ME, leading=True, now=100.0, wall=WALL, lease_duration_s=3).action is Action.LOST


def test_observe_keeps_the_first_seen_time_until_the_record_changes() -> None:
    record = LeaseRecord(OTHER, 3, 0, WALL, WALL)
    first = observe(None, record, "5", 10.0)
    assert observe(first, record, "5", 12.0).observed_at == 10.0
    renewed = LeaseRecord(OTHER, 3, 0, WALL, WALL + dt.timedelta(seconds=1))
    assert observe(first, renewed, "6", 12.0).observed_at == 12.0
    # Same spec, new resourceVersion (any write): the holder is alive, restart the clock.
    assert observe(first, record, "6", 12.5).observed_at == 12.5


def test_a_follower_polling_a_renewing_leader_never_takes_over() -> None:
    """Simulate the leader renewing every RENEW_PERIOD_S and a follower polling every
    RETRY_PERIOD_S for a minute: the follower never decides to acquire."""
    obs: Observation | None = None
    version = 0
    t = 0.0
    while t < 60.0:
        # The leader's renewals land at whole multiples of the renew period.
        version = int(t // RENEW_PERIOD_S)
        record = LeaseRecord(OTHER, LEASE_DURATION_S, 0, WALL, WALL + dt.timedelta(seconds=version))
        obs = observe(obs, record, str(version), t)
        assert decide(obs, identity=ME, leading=False, now=t, wall=WALL,
                      lease_duration_s=LEASE_DURATION_S).action is Action.WAIT
        t += RETRY_PERIOD_S


def test_takeover_bound_after_a_kill() -> None:
    """Worst case: the leader renews at 0 and dies just before its next renewal; the
    follower saw the renewal late by one poll. It acquires within 5 s of the kill."""
    kill = RENEW_PERIOD_S - 1e-3
    record = LeaseRecord(OTHER, LEASE_DURATION_S, 0, WALL, WALL)
    obs = observe(None, record, "1", 0.0)
    t = 0.0
    while decide(obs, identity=ME, leading=False, now=t, wall=WALL,
                 lease_duration_s=LEASE_DURATION_S).action is Action.WAIT:
        t += RETRY_PERIOD_S
    assert t - kill < 5.0
    # and the earliest takeover leaves the old leader time to have exited first
    assert t >= RENEW_DEADLINE_S + 0.5


def test_renew_deadline() -> None:
    assert not renew_overdue(10.0, 11.99, 2.0)
    assert renew_overdue(10.0, 12.0, 2.0)


def test_constants_leave_the_old_leader_time_to_stop_before_a_takeover() -> None:
    assert RENEW_PERIOD_S < RENEW_DEADLINE_S < LEASE_DURATION_S
    assert RETRY_PERIOD_S <= RENEW_PERIOD_S
    # Two renewal attempts fit before the deadline.
    assert 2 * RENEW_PERIOD_S <= RENEW_DEADLINE_S


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"identity": ""}, "identity"),
    ({"renew_deadline_s": 3.0}, "shorter than the lease"),
    ({"renew_period_s": 2.0}, "renew period"),
])
def test_config_rejects_unsafe_settings(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "l", "namespace": "ns", "identity": ME}
    with pytest.raises(ValueError, match=message):
        LeaderElectionConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_operator_cli_leader_election_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuroute import cli

    monkeypatch.setenv("POD_NAME", "gpuroute-operator-abc12")
    args = cli.build_parser().parse_args(["operator"])
    assert (args.lease_name, args.lease_namespace, args.identity, args.no_leader_election) == (
        "gpuroute-operator", None, None, False)
    assert args.pod_name == "gpuroute-operator-abc12"
    args = cli.build_parser().parse_args(["operator", "--lease-name", "l", "--lease-namespace", "ns",
                                          "--identity", "me", "--no-leader-election"])
    assert (args.lease_name, args.lease_namespace, args.identity, args.no_leader_election) == ("l", "ns", "me", True)
    assert cli.build_parser().parse_args(["demo"]).operators == 2
