"""The engine-to-event-loop bridge: Stream.listen and the merging of waiting events."""

from mixtral_jax.serve.app import _merged, _waiting_events
from mixtral_jax.serve.rows import Event, Request, Stream


def _stream():
    return Stream(Request([1, 2], 4), lambda: None)


def test_listener_is_called_per_event_and_at_once_for_events_already_waiting():
    stream, calls = _stream(), []
    stream.put(Event([5], None, None))
    stream.listen(lambda: calls.append("x"))
    assert calls == ["x"]  # an event was waiting
    stream.put(Event([6], None, None))
    assert calls == ["x", "x"]


def test_waiting_events_stop_at_a_finish_and_merge_in_order():
    stream = _stream()
    route = [[(0, 0.75), (3, 0.25)]]
    stream.put(Event([5], [route], None))
    stream.put(Event([6, 7], [route, route], None))
    stream.put(Event([], [], "length"))
    stream.put(Event([9], None, None))  # after the finish: not taken
    events = _waiting_events(stream)
    assert [e.tokens for e in events] == [[5], [6, 7], []]
    merged = _merged(events)
    assert merged.tokens == [5, 6, 7] and merged.routing == [route] * 3
    assert merged.finish == "length"
    assert _merged([Event([1], None, None), Event([2], None, None)]).routing is None
    assert _waiting_events(_stream()) == []
