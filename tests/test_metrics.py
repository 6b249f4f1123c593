"""observe_many relies on prometheus_client's Histogram internals: it must give what observe() gives."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from gateway.metrics import observe_many


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("h_seconds", "test", registry=registry, buckets=(0.001, 0.01, 0.1, 1.0))


def test_observe_many_matches_observe() -> None:
    values = [-1.0, 0.0, 0.001, 0.0010001, 0.005, 0.01, 0.5, 1.0, 1.5, 1e9, 0.1, 0.1]
    one_by_one_registry, one_by_one = _histogram()
    for value in values:
        one_by_one.observe(value)
    bulk_registry, bulk = _histogram()
    observe_many(bulk, values[:5])
    observe_many(bulk, [])
    observe_many(bulk, values[5:])
    assert _samples(bulk_registry) == _samples(one_by_one_registry)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
