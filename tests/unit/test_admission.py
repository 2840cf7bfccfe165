"""Admission under overload: refused on arrival when the measured rate says the answer would come
after the request's deadline; admitted otherwise, and always before anything is measured."""

from hypothesis import given
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
    # 16 inside: the 17th would take 17/32 = 0.53 s
    assert admission.enter(deadline=clock.now + 0.6) is None
    refused = admission.enter(deadline=clock.now + 0.5)
    assert refused.status == 503 and "overloaded" in refused.message and "17 requests ahead" not in refused.message
    assert "16 requests ahead" in refused.message
    assert admission.inside == 16  # the refused one is not counted
    admission.leave()
    assert admission.enter(deadline=clock.now + 0.53) is None


def test_batches_in_flight_at_once_multiply_the_rate():
    clock = Clock()
    one, two = Admission(1, clock=clock), Admission(2, clock=clock)
    for admission in (one, two):
        admission.observe(answered=10, seconds=1.0)
        for _ in range(9):
            admission.enter(deadline=None)
    assert one.enter(deadline=clock.now + 0.9) is not None  # 10 / 10 per s = 1 s
    assert two.enter(deadline=clock.now + 0.9) is None  # 10 / 20 per s = 0.5 s


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


def test_the_queue_for_a_budget_leaves_room_for_the_batches_in_flight_and_its_own():
    from handlers.engine.admission import queue_size_for

    # The image classifier on 2 cores: ~46 requests/s in batches of 16, clients that wait 1 s.
    assert queue_size_for(1.0, 46.0, 16) == 9  # 0.9 × 46 − 32
    assert queue_size_for(2.0, 46.0, 16) == 50
    assert queue_size_for(1.0, 1000.0, 16, workers=2) == 836
    assert queue_size_for(0.5, 46.0, 16) == 1  # too slow for the budget: the shortest queue
