"""Shared-backend queue: known answers, invariants on random loads, fair share against a flood."""

from __future__ import annotations

import doctest
from typing import cast

import numpy as np
import pytest

from qabuse_dagster.simulation import queue
from qabuse_dagster.simulation.queue import (
    MIN_SERVICE_S,
    Backend,
    QueuePolicy,
    ScheduleResult,
    schedule,
    service_seconds,
)

POLICIES: tuple[QueuePolicy, ...] = ("fifo", "fair_share")


def run(
    submit: list[float],
    service: list[float],
    *,
    capacity: int = 1,
    tenant: list[int] | None = None,
    policy: QueuePolicy = "fifo",
) -> ScheduleResult:
    n = len(submit)
    return schedule(
        np.array(submit, dtype=float),
        np.array(service, dtype=float),
        np.zeros(n, dtype=np.int64),
        np.array(tenant if tenant is not None else [0] * n),
        [Backend("qpu", capacity=capacity, seconds_per_unit=1.0)],
        policy=policy,
    )


def test_module_example_runs() -> None:
    assert doctest.testmod(queue).failed == 0


def test_service_seconds_scales_with_shots_circuits_depth_and_has_a_floor() -> None:
    backends = [Backend("sim", 4, 2.0), Backend("qpu", 1, 50.0)]
    got = service_seconds(
        backends,
        np.array([0, 1, 1, 0]),
        shots=np.array([1000, 1000, 4000, 1]),
        num_circuits=np.array([10, 10, 10, 1]),
        depth=np.array([100, 100, 0, 1]),
    )
    np.testing.assert_allclose(got, [2.0, 50.0, 50.0 * 0.04, MIN_SERVICE_S])


@pytest.mark.parametrize("policy", POLICIES)
def test_one_slot_starts_at_submit_or_previous_end(policy: QueuePolicy) -> None:
    submit = [0.0, 1.0, 2.0, 10.0, 10.5]
    service = [3.0, 1.0, 2.0, 1.0, 1.0]
    result = run(submit, service, policy=policy)
    expected, end = [], -np.inf
    for t, s in zip(submit, service, strict=True):
        expected.append(max(t, end))
        end = expected[-1] + s
    np.testing.assert_allclose(result.start_s, expected)  # [0, 3, 4, 10, 11]
    np.testing.assert_allclose(result.queue_s, [0.0, 2.0, 2.0, 0.0, 0.5])


def test_two_slots_fifo() -> None:
    result = run([0.0, 0.0, 0.0, 1.0], [5.0, 2.0, 1.0, 1.0], capacity=2)
    # Job 2 takes the slot job 1 frees at 2; job 3 waits for job 2 to end at 3.
    np.testing.assert_allclose(result.start_s, [0.0, 0.0, 2.0, 3.0])
    np.testing.assert_allclose(result.end_s, [5.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("policy", POLICIES)
def test_idle_backend_has_no_queue(policy: QueuePolicy) -> None:
    result = run([0.0, 10.0, 20.0, 20.0], [1.0, 1.0, 1.0, 1.0], capacity=2, policy=policy)
    np.testing.assert_array_equal(result.queue_s, 0.0)


def test_backends_do_not_share_slots() -> None:
    result = schedule(
        np.zeros(4),
        np.full(4, 1.0),
        np.array([0, 1, 0, 1]),
        np.zeros(4, dtype=np.int64),
        [Backend("a", 1, 1.0), Backend("b", 1, 1.0)],
    )
    np.testing.assert_allclose(result.start_s, [0.0, 0.0, 1.0, 1.0])


def test_fair_share_serves_the_least_served_tenant_first() -> None:
    # Tenant 0 queues three jobs; tenant 1 arrives later, but starts as soon as a slot frees.
    result = run(
        [0.0, 0.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0], tenant=[0, 0, 0, 1], policy="fair_share"
    )
    np.testing.assert_allclose(result.start_s, [0.0, 2.0, 3.0, 1.0])


def random_load(seed: int, n: int = 4000) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    # Unsorted, and rounded so that many jobs share a submit instant.
    submit = np.round(rng.uniform(0, 2000, n), 1)
    service = rng.exponential(2.0, n)
    backend = rng.integers(0, 3, n)
    tenant = rng.integers(0, 7, n)
    return submit, service, backend, tenant


BACKENDS = [Backend("qpu", 1, 30.0), Backend("small_sim", 2, 1.0), Backend("sim", 5, 0.5)]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_on_random_load(policy: QueuePolicy, seed: int) -> None:
    submit, service, backend, tenant = random_load(seed)
    result = schedule(submit, service, backend, tenant, BACKENDS, policy=policy)
    for column in (result.start_s, result.end_s, result.queue_s):
        assert column.shape == submit.shape and np.isfinite(column).all()
    assert (result.start_s >= submit).all()
    np.testing.assert_array_equal(result.end_s, result.start_s + service)
    np.testing.assert_array_equal(result.queue_s, result.start_s - submit)
    for b, spec in enumerate(BACKENDS):
        on = backend == b
        # Sweep: +1 at each start, -1 at each end; ends sort before starts at the same instant.
        times = np.concatenate([result.start_s[on], result.end_s[on]])
        steps = np.concatenate([np.ones(on.sum()), -np.ones(on.sum())])
        order = np.lexsort((steps, times))
        assert np.cumsum(steps[order]).max() <= spec.capacity
    # Work-conserving: every backend is busy whenever a job waits, so a loaded run queues.
    assert result.queue_s.max() > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_same_inputs_give_identical_outputs(policy: QueuePolicy) -> None:
    load = random_load(5)
    first = schedule(*load, BACKENDS, policy=policy)
    second = schedule(*(a.copy() for a in load), BACKENDS, policy=policy)
    np.testing.assert_array_equal(first.start_s, second.start_s)
    np.testing.assert_array_equal(first.end_s, second.end_s)


def flood_and_light(with_flood: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    light_submit = np.arange(1.0, 11.0)
    flood_submit = np.zeros(1000 if with_flood else 0)
    submit = np.concatenate([flood_submit, light_submit])
    tenant = np.concatenate([np.zeros(flood_submit.size, np.int64), np.ones(10, np.int64)])
    return submit, np.full(submit.size, 1.0), tenant


def light_mean_queue(with_flood: bool, policy: QueuePolicy) -> tuple[float, float]:
    submit, service, tenant = flood_and_light(with_flood)
    backend = np.zeros(submit.size, np.int64)
    result = schedule(submit, service, backend, tenant, BACKENDS[:1], policy=policy)
    return float(result.queue_s[tenant == 1].mean()), float(result.end_s.max())


def test_fair_share_protects_a_light_tenant_from_a_flood_at_no_throughput_cost() -> None:
    fifo_wait, fifo_makespan = light_mean_queue(with_flood=True, policy="fifo")
    fair_wait, fair_makespan = light_mean_queue(with_flood=True, policy="fair_share")
    assert fifo_wait >= 10 * max(fair_wait, 0.1)
    assert fair_makespan == fifo_makespan


def test_a_flood_delays_everyone_else_under_fifo() -> None:
    quiet_wait, _ = light_mean_queue(with_flood=False, policy="fifo")
    flooded_wait, _ = light_mean_queue(with_flood=True, policy="fifo")
    assert quiet_wait == 0.0
    assert flooded_wait >= 900.0  # 1000 one-second flood jobs ahead of each light job


def test_bad_inputs_are_refused() -> None:
    submit, service, backend, tenant = np.zeros(2), np.ones(2), np.zeros(2, np.int64), np.arange(2)
    with pytest.raises(ValueError, match="unknown queue policy"):
        schedule(submit, service, backend, tenant, BACKENDS, policy=cast(QueuePolicy, "lifo"))
    with pytest.raises(ValueError, match="backend_idx"):
        schedule(submit, service, np.array([0, 3]), tenant, BACKENDS)
    with pytest.raises(ValueError, match="service_s"):
        schedule(submit, np.array([1.0, -1.0]), backend, tenant, BACKENDS)
    with pytest.raises(ValueError, match="same length"):
        schedule(submit, service, backend, np.array([0]), BACKENDS)


def test_backend_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Backend("broken", capacity=0, seconds_per_unit=1.0)


def test_the_twin_takes_queue_times_from_the_shared_backends(tmp_path) -> None:
    """A credit drain's long jobs on a backend make the others on it wait."""
    import json

    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    result = simulate(
        hours=24,
        seed=3,
        out=tmp_path,
        hasher=KeyedHasher(b"queue-test-key-0123456789abcdef"),
        scenarios=["credit_drain"],
    )
    (label,) = result.incidents
    drained = set(label.api_key_ids or ())
    waits_during, waits_before = [], []
    for line in result.telemetry_path.read_text().splitlines():
        record = json.loads(line)
        if record["api_key_id"] in drained or record["queue_time_s"] is None:
            continue
        during = (
            label.start.isoformat()[:16] <= record["timestamp"][:16] < label.end.isoformat()[:16]
        )
        (waits_during if during else waits_before).append(record["queue_time_s"])
    assert waits_during and waits_before
    assert max(waits_during) > 10 * max(1.0, float(np.median(waits_before)))
