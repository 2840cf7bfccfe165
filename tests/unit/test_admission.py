"""Admission under overload: refused on arrival when the measured rate says the answer would come
after the request's deadline; admitted otherwise, and always before anything is measured."""

from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.engine.admission import Admission


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_everything_is_admitted_until_a_rate_has_been_measured_and_without_a_deadline():
    admission = Admission(clock=Clock())
    assert all(admission.enter(deadline=100.001) is None for _ in range(50))
    admission.observe(answered=10, seconds=1.0)  # 10 requests/s
    assert admission.enter(deadline=None) is None
    assert admission.inside == 51


def test_a_request_that_would_be_answered_after_its_deadline_is_refused_with_a_503_that_says_why():
    clock = Clock()
    admission = Admission(clock=clock)
    admission.observe(answered=16, seconds=0.5)  # 32 requests/s
    for _ in range(15):
        assert admission.enter(deadline=clock.now + 1.0) is None
    # 16 inside: the 17th would take 17/32 = 0.53 s, which may use 80% of the time left
    assert admission.enter(deadline=clock.now + 0.67) is None
    refused = admission.enter(deadline=clock.now + 0.66)
    assert refused.status == 503 and "overloaded" in refused.message and "17 requests ahead" not in refused.message
    assert "16 requests ahead" in refused.message
    assert admission.inside == 16  # the refused one is not counted
    admission.leave()
    assert admission.enter(deadline=clock.now + 0.67) is None


def test_the_prediction_is_the_requests_inside_over_the_rate_delivered_whatever_the_batches_in_flight():
    clock = Clock()
    one, two = Admission(1, clock=clock), Admission(2, clock=clock)
    for admission in (one, two):
        admission.observe(answered=10, seconds=1.0)
        for _ in range(9):
            admission.enter(deadline=None)
        assert admission.enter(deadline=clock.now + 0.9) is not None  # 10 / 10 per s = 1 s
    two.observe(answered=30, seconds=1.0)  # 0.7 × 10 + 0.3 × 30 = 16 per s
    assert two.enter(deadline=clock.now + 0.9) is None  # 10 / 16 per s = 0.625 s, under 0.8 × 0.9 s


@given(st.lists(st.tuples(st.integers(0, 64), st.floats(0.0, 5.0, allow_nan=False)), max_size=30))
def test_the_rate_is_a_moving_average_of_the_batches_and_ignores_empty_ones(batches):
    admission = Admission(clock=Clock())
    rates = [answered / seconds for answered, seconds in batches if answered > 0 and seconds > 0]
    for answered, seconds in batches:
        admission.observe(answered, seconds)
    if not rates:
        assert admission.rate is None
    else:
        assert min(rates) * (1 - 1e-9) <= admission.rate <= max(rates) * (1 + 1e-9)


def test_leave_never_counts_below_zero():
    admission = Admission(clock=Clock())
    admission.leave()
    assert admission.inside == 0


def test_the_queue_for_a_budget_is_whole_rounds_of_batches_answered_in_time():
    from handlers.engine.admission import queue_size_for

    # The image classifier on 2 cores: 66-75 requests/s in batches of 16 (0.21-0.24 s each),
    # clients that wait 1 s: one batch waits while one runs; a second would answer late.
    assert queue_size_for(1.0, 66.0, 16) == 16
    assert queue_size_for(1.0, 74.0, 16) == 16
    # Rounds sized at half the timed speed (a retry storm's): (1 + rounds) × 2 × round ≤ 0.6 × budget.
    assert queue_size_for(2.0, 46.0, 16) == 16  # rounds of 0.35 s, 0.70 s in a storm: (1 + 1) × 0.70 > 1.2
    assert queue_size_for(4.0, 46.0, 16) == 32  # (1 + 2) × 0.70 ≤ 2.4
    assert queue_size_for(1.0, 1000.0, 16, workers=2) == 256  # 8 rounds of 32: (1 + 8) × 0.064 ≤ 0.6
    # Regression (issue 30): less than two rounds fit, and the queue was what fits of one round (2
    # for batches of 16 on a slow day), which refused at 1x. Now one round (plan_queue makes the
    # batch smaller: tests/unit/test_queue_sizing.py).
    assert queue_size_for(1.0, 40.0, 16) == 16
    assert queue_size_for(0.5, 46.0, 16) == 16


@settings(max_examples=300, deadline=None)
@given(budget=st.floats(0.05, 30.0), capacity=st.floats(0.5, 5000.0), batch=st.integers(1, 128),
       workers=st.integers(1, 8))
def test_the_last_queued_request_is_answered_within_the_share_of_the_budget(budget, capacity, batch, workers):
    """Whatever the model: a queue of whole rounds never exceeds the share of the budget for its
    last request (the round in flight, the rounds ahead, its own), and one more round would."""
    from handlers.engine.admission import QUEUE_SHARE_OF_BUDGET, STORM_SLOWDOWN, queue_size_for

    queue = queue_size_for(budget, capacity, batch, workers)
    round_size, round_s = batch * workers, STORM_SLOWDOWN * batch * workers / capacity
    share = QUEUE_SHARE_OF_BUDGET * budget
    assert queue >= round_size and queue % round_size == 0  # whole rounds, never less than one
    rounds = queue // round_size
    if 2 * round_s <= share * (1 - 1e-9):  # a round waiting behind the one in flight fits
        assert (1 + rounds) * round_s <= share * (1 + 1e-9)
        assert (2 + rounds) * round_s > share * (1 - 1e-9)
    elif 2 * round_s > share * (1 + 1e-9):  # it does not: one round (a smaller batch is plan_queue's to pick)
        assert rounds == 1


def test_back_to_back_batches_count_the_time_between_their_ends_not_only_the_model_time():
    """Under load a batch starts when the last one ends (its requests were waiting): the rate is
    what is delivered end to end. After an idle gap only the batch's own time counts."""
    clock = Clock()
    admission = Admission(clock=clock)
    for _ in range(40):
        admission.enter(deadline=None)
    admission.finished(answered=16, batch_size=16, started=100.0, ended=100.2)  # 24 more waiting
    assert abs(admission.rate - 80.0) < 1e-9
    for _ in range(16):
        admission.leave()
    # The next batch (the other 24) ran 0.2 s too, but began 0.1 s after the last one ended.
    admission.finished(answered=24, batch_size=24, started=100.3, ended=100.5)
    assert abs(admission.rate - (0.7 * 80 + 0.3 * 24 / 0.3)) < 1e-9
    for _ in range(24):
        admission.leave()
    # Nothing was waiting when that one ended: after the idle gap, the batch's own 0.2 s; a
    # lone request says how fast one is answered, not how fast the replica can answer, so its
    # 5 requests/s does not lower the rate (tests/unit/test_door_regressions.py).
    admission.enter(deadline=None)
    rate = admission.rate
    admission.finished(answered=1, batch_size=1, started=105.0, ended=105.2)
    assert admission.rate == rate
    admission.finished(answered=24, batch_size=24, started=110.0, ended=110.2)  # a full batch: counted
    assert abs(admission.rate - (0.7 * rate + 0.3 * 24 / 0.2)) < 1e-9


def test_with_batches_in_flight_at_once_the_rate_is_what_they_deliver_together():
    """Two batches share the model: each takes twice its share, and one ends every 0.2 s. The
    rate is 16 per 0.2 s, as delivered, not 16 per the 0.4 s each batch took (which would
    predict answers twice as late), and not a burst when two end together."""
    admission = Admission(2, clock=Clock())
    for _ in range(64):
        admission.enter(deadline=None)
    admission.finished(answered=16, batch_size=16, started=100.0, ended=100.4)  # nothing before: its own time
    assert abs(admission.rate - 40.0) < 1e-9
    admission.finished(answered=16, batch_size=16, started=100.2, ended=100.6)
    assert abs(admission.rate - (0.7 * 40 + 0.3 * 80)) < 1e-9
    rate = admission.rate
    # Ended 1 ms after the last one: the interval is at least its own 0.4 s shared by the two.
    admission.finished(answered=16, batch_size=16, started=100.201, ended=100.601)
    assert abs(admission.rate - (0.7 * rate + 0.3 * 16 / 0.2)) < 1e-9


def test_an_idle_server_admits_even_a_request_it_predicts_late():
    """Nothing inside: a refusal would spare no one's time (the margin would otherwise refuse
    every request to a model whose one call takes most of the budget)."""
    clock = Clock()
    admission = Admission(clock=clock)
    admission.observe(answered=1, seconds=1.05)  # one call takes 1.05 s
    assert admission.enter(deadline=clock.now + 1.2) is None  # 1.05 s > 80% of 1.2 s, but idle
    assert admission.enter(deadline=clock.now + 1.2) is not None  # one ahead: 2.1 s


@settings(max_examples=200, deadline=None)
@given(inside=st.integers(1, 500), rate=st.floats(0.5, 5000.0))
def test_the_shortest_timeout_it_publishes_is_where_admission_turns_from_refusing_to_admitting(inside, rate):
    """What the replica publishes to HAProxy (handlers.servers.haproxy_gate): a client timeout
    just under it is refused, one just over it admitted."""
    clock = Clock()
    admission = Admission(clock=clock)
    admission.observe(answered=int(rate * 1000), seconds=1000.0)
    for _ in range(inside):
        admission.enter(deadline=None)
    shortest = admission.shortest_timeout()
    assert shortest > 0
    assert admission.refusal(deadline=clock.now + shortest * 0.999) is not None
    assert admission.refusal(deadline=clock.now + shortest * 1.001) is None


def test_the_shortest_timeout_is_0_on_an_empty_replica_and_before_any_rate():
    """0: HAProxy refuses nothing. A replica that empties says so, whatever it measured."""
    clock = Clock()
    admission = Admission(clock=clock)
    admission.enter(deadline=None)
    assert admission.shortest_timeout() == 0  # no rate yet
    admission.observe(answered=10, seconds=1.0)
    assert admission.shortest_timeout() == (1 + 1) / 10 / 0.8
    admission.leave()
    assert admission.shortest_timeout() == 0
