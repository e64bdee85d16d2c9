"""Property tests of the tus extension parsers and the deferred-length state machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tornado_longconn.exceptions import UploadError
from tornado_longconn.upload import UploadState
from tornado_longconn.upload_tus import _parse_concat

ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)


@given(st.text(max_size=200))
def test_upload_concat_parser_answers_400_or_a_value(header: str) -> None:
    try:
        result = _parse_concat(header)
    except UploadError as err:
        assert err.status == 400
        return
    assert result == "partial" or (isinstance(result, list) and result)


@given(
    st.lists(ids, min_size=1, max_size=5),
    st.sampled_from(["", "/files/", "https://up.example/files/", "../x/"]),
)
def test_upload_concat_final_names_every_id_in_order(parts: list[str], base: str) -> None:
    header = "final;" + " ".join(base + part for part in parts)
    assert _parse_concat(header) == parts


@given(
    st.integers(min_value=0, max_value=1000),
    st.lists(
        st.one_of(
            st.tuples(st.just("accept"), st.integers(min_value=0, max_value=300)),
            st.tuples(st.just("declare"), st.integers(min_value=0, max_value=1200)),
        ),
        max_size=12,
    ),
)
def test_deferred_length_state_machine(max_size: int, steps: list[tuple[str, int]]) -> None:
    state = UploadState(size=None, max_size=max_size, now=0.0)
    declared: int | None = None
    for op, n in steps:
        before = (state.accepted, state.size, state.deferred)
        try:
            if op == "accept":
                state.accept(n)
                state.stored(n, 0.0)
            else:
                state.declare_length(n)
                if declared is None:
                    declared = n
        except UploadError as err:
            assert err.status in (400, 413)
            assert (state.accepted, state.size, state.deferred) == before  # nothing changed
        # Invariants: never past the declared length (or max_size while deferred);
        # stored only once the length is known and reached.
        assert state.accepted <= (max_size if declared is None else declared) <= max_size
        assert state.deferred is (declared is None)
        assert state.is_stored == (declared is not None and state.offset == declared)
    if declared is None:
        with pytest.raises(UploadError):
            state.complete()
