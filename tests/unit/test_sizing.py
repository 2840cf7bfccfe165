"""Micro-batch sizing strategies: pure rules, checked on costs you can reason about."""

import random

import pytest

from handlers import ConfigError, EngineSettings
from handlers.engine.batch_engine import BatchEngine, plan_micro_batches
from handlers.engine.sizing import (
    AdaptiveSizing,
    DynamicSizing,
    StaticSizing,
    best_micro_batch_size,
    predicted_batch_seconds,
)


def test_static_keeps_its_size():
    assert StaticSizing(4).size_for(32) == 4 and StaticSizing(None).size_for(32) is None


@pytest.mark.parametrize("batch, pool, expected", [(32, 2, 16), (32, 4, 8), (7, 2, 4), (1, 2, 1), (32, 1, 16)])
def test_dynamic_makes_one_micro_batch_per_pool_thread_and_at_least_two(batch, pool, expected):
    assert DynamicSizing(pool).size_for(batch) == expected


def test_the_makespan_model_on_hand_computed_cases():
    # 4 items, 1 thread, 1 s each to preprocess, model free: 4 s whatever the size.
    assert predicted_batch_seconds(4, 1, 1, 1.0, 0.0, 0.0) == 4.0
    # Model calls cost 1 s fixed: whole batch = 4 s preprocess + 1 s; size 1 = 1 s + 4 calls = 5 s.
    assert predicted_batch_seconds(4, 4, 1, 1.0, 1.0, 0.0) == 5.0
    assert predicted_batch_seconds(4, 1, 1, 1.0, 1.0, 0.0) == 5.0
    assert predicted_batch_seconds(4, 2, 1, 1.0, 1.0, 0.0) == 5.0


def test_cheap_model_calls_favour_small_micro_batches():
    # Preprocessing dominates and each call is nearly free per item: overlap wins.
    assert best_micro_batch_size(32, 2, per_item_pre=0.05, call_fixed=0.0005, call_per_item=0.001) <= 4


def test_a_costly_fixed_call_favours_large_micro_batches():
    assert best_micro_batch_size(32, 2, per_item_pre=0.001, call_fixed=0.2, call_per_item=0.001) == 32


def serve(sizing, batches: int, batch_size: int, call_seconds, per_item_pre: float) -> list:
    """Run ``batches`` batches through ``sizing`` with a made-up model; the sizes it chose."""
    chosen = []
    for _ in range(batches):
        size = sizing.size_for(batch_size) or batch_size
        chosen.append(size)
        calls = [(len(r), call_seconds(len(r))) for r in plan_micro_batches(batch_size, size)]
        sizing.observe(batch_size, preprocess_seconds=batch_size * per_item_pre, calls=calls)
    return chosen


def test_adaptive_skips_the_first_batch_then_tries_the_whole_batch_then_a_quarter():
    sizing = AdaptiveSizing(pool_size=16)
    chosen = serve(sizing, 3, 32, lambda m: 0.005, per_item_pre=0.04)
    assert chosen == [32, 32, 8]


def test_adaptive_learns_the_costs_and_moves_to_the_best_size():
    sizing = AdaptiveSizing(pool_size=2)
    serve(sizing, 30, 32, lambda m: 0.2 + 0.001 * m, per_item_pre=0.001)  # a big fixed cost per call
    assert sizing.size_for(32) == 32
    cheap_calls = AdaptiveSizing(pool_size=2)  # slow preprocessing, cheap calls: cut, to overlap
    serve(cheap_calls, 30, 32, lambda m: 0.0005 + 0.001 * m, per_item_pre=0.05)
    assert cheap_calls.size_for(32) <= 8


def test_a_slow_first_call_and_a_flat_gpu_cost_do_not_pin_adaptive_at_size_1():
    # Seen on an H100: ResNet-50 calls cost ~5 ms whatever their size (launch-bound), but the very
    # first one pays for cuDNN's set-up. Fitted from that batch, the slow first call made size
    # look costly, and the sizing stayed at 1 (32 calls a batch, a quarter of the throughput).
    rng = random.Random(0)
    calls_made = []

    def call_seconds(m):
        calls_made.append(m)
        return 0.5 if len(calls_made) == 1 else 0.005 * rng.uniform(0.7, 1.3) + 0.0001 * m

    sizing = AdaptiveSizing(pool_size=16)
    chosen = serve(sizing, 64, 32, call_seconds, per_item_pre=0.04)
    settled = chosen[3:]
    assert min(settled) >= 7  # a probe at half the choice is the smallest size tried
    assert sum(size >= 15 for size in settled) >= len(settled) - 2  # two halves (or a whole): few calls


def test_adaptive_probes_beside_its_choice_now_and_then_and_follows_a_change():
    sizing = AdaptiveSizing(pool_size=2)
    chosen = serve(sizing, 64, 32, lambda m: 0.2 + 0.001 * m, per_item_pre=0.001)
    probes = [size for size in chosen[3:] if size != 32]
    assert probes == [16, 16]  # batch 32 and batch 64: half the choice (double is past the batch)
    # The model gets cheap per call (say, it moved to a faster device): the probes notice.
    chosen = serve(sizing, 200, 32, lambda m: 0.0005 + 0.001 * m, per_item_pre=0.05)
    assert chosen[-1] <= 8


def test_the_engine_cuts_batches_with_its_strategy():
    seen = []

    def infer(items):
        seen.append(len(items))
        return items

    settings = EngineSettings(micro_batch_strategy="dynamic", pool_size=4, deadline_s=10)
    with BatchEngine(lambda r: r, infer, lambda o, i: o, settings) as engine:
        report = engine.run(list(range(32)))
    assert report.micro_batch_sizes == [8, 8, 8, 8] and sorted(seen) == [8, 8, 8, 8]


def test_an_unknown_strategy_is_refused_by_name():
    with pytest.raises(ConfigError, match="handler.micro_batch_strategy must be one of static, dynamic, adaptive, got 'smart'"):
        EngineSettings(micro_batch_strategy="smart")


def test_on_shared_cpu_cores_adaptive_runs_the_whole_batch():
    sizing = AdaptiveSizing(pool_size=2, shared_cores=True)
    serve(sizing, 10, 32, lambda m: 0.001 + 0.0005 * m, per_item_pre=0.05)
    # On an accelerator this cost profile favours small micro-batches; sharing the cores it does not.
    assert sizing.size_for(32) == 32
    assert best_micro_batch_size(32, 2, 0.05, 0.001, 0.0005, shared_cores=False) < 32


def test_a_strategy_of_ones_own_is_registered_by_name_and_chosen_in_the_config():
    from handlers import register_sizing
    from handlers.engine.batch_engine import BatchEngine

    seen = []

    class Thirds:
        def size_for(self, batch_size):
            return max(1, batch_size // 3)

        def observe(self, batch_size, preprocess_seconds, calls):
            seen.append([size for size, _ in calls])

    register_sizing("thirds", lambda size, pool, shared: Thirds())
    settings = EngineSettings(micro_batch_strategy="thirds", pool_size=2)
    with BatchEngine(float, lambda xs: [2 * x for x in xs], lambda y, x: y, settings) as engine:
        report = engine.run(list(range(9)))
    assert report.micro_batch_sizes == [3, 3, 3]
    assert [o.value for o in report.outcomes] == [2.0 * i for i in range(9)]
    assert seen == [[3, 3, 3]]
