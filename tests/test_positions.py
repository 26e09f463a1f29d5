"""pyreft's position rules: `Positions.locations` against a literal copy of pyreft 0.1.0's code."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.positions import MAX_POSITION_COUNT, Positions, PositionsError

# ---------------------------------------------------------------------------------------------
# Transcribed literally from pyreft 0.1.0, pyreft/dataset.py (parse_positions and
# get_intervention_locations). Only the function names changed.
# ---------------------------------------------------------------------------------------------


def pyreft_parse_positions(positions: str):
    # parse position
    first_n, last_n = 0, 0
    if "+" in positions:
        first_n = int(positions.split("+")[0].strip("f"))
        last_n = int(positions.split("+")[1].strip("l"))
    else:
        if "f" in positions:
            first_n = int(positions.strip("f"))
        elif "l" in positions:
            last_n = int(positions.strip("l"))
    return first_n, last_n


def pyreft_get_intervention_locations(**kwargs):
    """
    This function generates the intervention locations.

    For your customized dataset, you want to create your own function.
    """
    # parse kwargs
    share_weights = kwargs["share_weights"] if "share_weights" in kwargs else False
    last_position = kwargs["last_position"]
    if "positions" in kwargs:
        _first_n, _last_n = pyreft_parse_positions(kwargs["positions"])
    else:
        _first_n, _last_n = kwargs["first_n"], kwargs["last_n"]
    num_interventions = kwargs["num_interventions"]
    pad_mode = kwargs["pad_mode"] if "pad_mode" in kwargs else "first"

    first_n = min(last_position // 2, _first_n)
    last_n = min(last_position // 2, _last_n)

    pad_amount = (_first_n - first_n) + (_last_n - last_n)
    pad_position = -1 if pad_mode == "first" else last_position
    if share_weights or (first_n == 0 or last_n == 0):
        position_list = [i for i in range(first_n)] + \
            [i for i in range(last_position - last_n, last_position)] + \
            [pad_position for _ in range(pad_amount)]
        intervention_locations = [position_list]*num_interventions
    else:
        left_pad_amount = (_first_n - first_n)
        right_pad_amount = (_last_n - last_n)
        left_intervention_locations = [i for i in range(first_n)] + [pad_position for _ in range(left_pad_amount)]
        right_intervention_locations = [i for i in range(last_position - last_n, last_position)] + \
            [pad_position for _ in range(right_pad_amount)]
        # after padding, there could be still length diff, we need to do another check
        left_len = len(left_intervention_locations)
        right_len = len(right_intervention_locations)
        if left_len > right_len:
            right_intervention_locations += [pad_position for _ in range(left_len-right_len)]
        else:
            left_intervention_locations += [pad_position for _ in range(right_len-left_len)]
        intervention_locations = [left_intervention_locations]*(num_interventions//2) + \
            [right_intervention_locations]*(num_interventions//2)

    return intervention_locations


# ---------------------------------------------------------------------------------------------


def pyreft_expected(positions: str, prompt_length: int, num_interventions: int, share_weights: bool):
    """pyreft's locations with its pad entries (-1, pad_mode "first") dropped."""
    raw = pyreft_get_intervention_locations(
        positions=positions, last_position=prompt_length, num_interventions=num_interventions,
        share_weights=share_weights,
    )
    return [[p for p in locs if p != -1] for locs in raw]


def is_unshared_both_sides(positions: Positions, share_weights: bool) -> bool:
    return not share_weights and positions.first > 0 and positions.last > 0


POSITION_STRINGS = (
    [f"f{n}" for n in range(1, 8)]
    + [f"l{n}" for n in range(1, 8)]
    + [f"f{a}+l{b}" for a in range(1, 7) for b in range(1, 7)]
    + ["f0+l3", "f3+l0", "f20", "l20", "f25+l25", "f1+l30", "f30+l1"]
)


def test_pyreft_transcription_sanity():
    # The transcription itself, on cases worked out by hand (pads included).
    assert pyreft_get_intervention_locations(
        positions="f2+l2", last_position=10, num_interventions=2, share_weights=True
    ) == [[0, 1, 8, 9], [0, 1, 8, 9]]
    assert pyreft_get_intervention_locations(
        positions="f2+l2", last_position=10, num_interventions=2, share_weights=False
    ) == [[0, 1], [8, 9]]
    assert pyreft_get_intervention_locations(
        positions="f3+l1", last_position=4, num_interventions=2, share_weights=False
    ) == [[0, 1, -1], [3, -1, -1]]
    assert pyreft_get_intervention_locations(
        positions="l5", last_position=3, num_interventions=1
    ) == [[2, -1, -1, -1, -1]]


@pytest.mark.parametrize("positions", POSITION_STRINGS)
def test_locations_match_pyreft_exhaustively(positions):
    pos = Positions.parse(positions)
    checked = 0
    for prompt_length, num_interventions, share_weights in itertools.product(range(1, 41), range(1, 7), (True, False)):
        if is_unshared_both_sides(pos, share_weights) and num_interventions % 2:
            continue  # adapters refuse this combination (pyreft would drop the last intervention)
        got = pos.locations(prompt_length, num_interventions, share_weights)
        want = pyreft_expected(positions, prompt_length, num_interventions, share_weights)
        assert got == want, (positions, prompt_length, num_interventions, share_weights)
        assert len(got) == num_interventions
        for locs in got:
            assert all(0 <= p < prompt_length for p in locs)
            assert len(set(locs)) == len(locs)
        checked += 1
    assert checked >= 240


@settings(max_examples=300, deadline=None)
@given(
    first=st.integers(0, 60),
    last=st.integers(0, 60),
    prompt_length=st.integers(1, 200),
    half=st.integers(1, 4),
    share_weights=st.booleans(),
    odd=st.booleans(),
)
def test_locations_match_pyreft_property(first, last, prompt_length, half, share_weights, odd):
    if first + last == 0:
        first = 1
    text = f"f{first}+l{last}" if first and last else (f"f{first}" if first else f"l{last}")
    pos = Positions.parse(text)
    num_interventions = 2 * half
    if odd and not is_unshared_both_sides(pos, share_weights):
        num_interventions -= 1
    assert pos.locations(prompt_length, num_interventions, share_weights) == pyreft_expected(
        text, prompt_length, num_interventions, share_weights
    )


def test_short_prompt_caps_each_side_at_half():
    # prompt shorter than 2N: each count is capped at prompt_length // 2.
    assert Positions.parse("f5+l5").locations(7, 2, True) == [[0, 1, 2, 4, 5, 6]] * 2
    assert Positions.parse("f5+l5").locations(7, 2, False) == [[0, 1, 2], [4, 5, 6]]
    assert Positions.parse("f5+l5").locations(4, 4, False) == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert Positions.parse("f4").locations(5, 1, False) == [[0, 1]]
    assert Positions.parse("l4").locations(5, 3, False) == [[3, 4]] * 3
    # a one-token prompt has no position at all (pyreft only has pads there)
    assert Positions.parse("f3+l3").locations(1, 2, False) == [[], []]
    assert Positions.parse("l1").locations(1, 1, True) == [[]]


def test_f_only_and_l_only():
    assert Positions.parse("f3").locations(20, 2, False) == [[0, 1, 2], [0, 1, 2]]
    assert Positions.parse("l3").locations(20, 2, False) == [[17, 18, 19], [17, 18, 19]]
    assert Positions.parse("f3").locations(20, 3, True) == [[0, 1, 2]] * 3


def test_unshared_gives_prefix_to_first_half_suffix_to_second_half():
    locs = Positions.parse("f2+l3").locations(12, 4, False)
    assert locs == [[0, 1], [0, 1], [9, 10, 11], [9, 10, 11]]
    shared = Positions.parse("f2+l3").locations(12, 4, True)
    assert shared == [[0, 1, 9, 10, 11]] * 4


@pytest.mark.parametrize(
    ("text", "first", "last"),
    [("f3", 3, 0), ("l7", 0, 7), ("f2+l2", 2, 2), ("f1+l9", 1, 9), (" f2+l2 ", 2, 2), ("f0+l3", 0, 3),
     ("f4096", MAX_POSITION_COUNT, 0)],
)
def test_parse_good(text, first, last):
    pos = Positions.parse(text)
    assert (pos.first, pos.last) == (first, last)
    assert pyreft_parse_positions(text.strip()) == (first, last)
    again = Positions.parse(str(pos))
    assert again == pos


@pytest.mark.parametrize("text", ["f3", "l7", "f2+l2", "f10+l1"])
def test_str_round_trips(text):
    assert str(Positions.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "x3", "f", "f0", "l0", "f-1", "f2+", "f2+l", "3", "f2 l2", None, "f0+l0", "l2+f2", "F2", "f2+l2+l3",
     "f2.5", "+l2", f"f{MAX_POSITION_COUNT + 1}", 3, ["f2"]],
)
def test_parse_bad(text):
    with pytest.raises(PositionsError) as info:
        Positions.parse(text)
    message = str(info.value)
    assert "positions" in message
    assert repr(text) in message  # the message quotes what was given
    assert isinstance(info.value, ValueError)
