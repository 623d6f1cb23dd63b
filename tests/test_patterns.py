import pytest
import torch

from clicktrain_deploy.pruning.patterns import (
    CENTRE_TAP, PATTERN_LIBRARIES, candidate_patterns, format_pattern, generate_library,
    parse_pattern, validate_library,
)


@pytest.mark.parametrize("name,size", [("clicktrain4", 4), ("clicktrain8", 8), ("clicktrain12", 12)])
def test_fixed_libraries_are_valid_4_of_9(name, size):
    library = validate_library(PATTERN_LIBRARIES.get(name)())
    assert library.shape == (size, 9)
    assert (library.sum(1) == 4).all()


def test_paper_corner_squares_come_first():
    corners = ["...|.XX|.XX", "...|XX.|XX.", ".XX|.XX|...", "XX.|XX.|..."]
    assert [format_pattern(p) for p in PATTERN_LIBRARIES.get("clicktrain4")()] == corners


def test_parse_format_round_trip_and_bad_text():
    assert format_pattern(parse_pattern("X.X|.X.|X..")) == "X.X|.X.|X.."
    with pytest.raises(ValueError, match="three rows"):
        parse_pattern("XX|..")


def test_validate_library_rejects_wrong_tap_count_and_repeats():
    five = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="keeps 5 taps"):
        validate_library(five)
    square = parse_pattern("...|.XX|.XX")
    with pytest.raises(ValueError, match="repeated"):
        validate_library(torch.stack([square, square]))


def test_candidate_counts():
    assert len(candidate_patterns(require_centre=True)) == 56
    assert candidate_patterns(require_centre=True)[:, CENTRE_TAP].all()
    assert len(candidate_patterns(require_centre=False)) == 126


def test_generated_library_recovers_the_shapes_the_kernels_use():
    # 300 groups whose importance sits on one of three shapes, in proportions 5:3:2, plus noise.
    generator = torch.Generator().manual_seed(0)
    shapes = [parse_pattern(s) for s in ("...|.XX|.XX", "XXX|.X.|...", "X..|XX.|X..")]
    rows = []
    for shape, count in zip(shapes, (150, 90, 60)):
        rows.append(shape.double() * 10 + torch.rand(count, 9, generator=generator, dtype=torch.float64))
    library = generate_library([torch.cat(rows)], size=3)
    assert {format_pattern(p) for p in library} == {format_pattern(s) for s in shapes}
    assert format_pattern(library[0]) == "...|.XX|.XX"  # largest share first


def test_generated_library_balances_layers_of_different_scale():
    # A layer with tiny weights still gets its shape into the library (groups vote equally).
    big = parse_pattern("...|.XX|.XX").double().repeat(50, 1) * 1e3
    small = parse_pattern("XX.|XX.|...").double().repeat(50, 1) * 1e-3
    library = generate_library([big, small], size=2)
    assert {format_pattern(p) for p in library} == {"...|.XX|.XX", "XX.|XX.|..."}
