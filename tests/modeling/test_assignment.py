"""The mask-driven assignment rule on hand-made cases, each rule failing alone, and mask targets."""

import pytest
import torch

from tensormask.modeling.assignment import assign_windows, mask_targets, rule_matrix

# one window of side 64 px at unit 4 (side - unit = 60), centred at (32, 32)
WINDOW = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
UNIT = torch.tensor([4.0])

GOOD = [8.0, 8.0, 56.0, 56.0]  # inside, side 48 -> limit 96 >= 60, centred
CASES = {
    # name: (gt box, the rule that must fail alone)
    "containment": ([-2.0, 8.0, 60.0, 56.0], "contain"),  # sticks out left; side 62, centre offset 0.75 unit
    "scale": ([30.0, 30.0, 34.0, 34.0], "scale"),  # side 4 -> limit max(8, 40) = 40 < 60
    "centrality": ([10.0, 10.0, 60.0, 60.0], "central"),  # centre (35, 35): distance 1.06 units
}


def test_good_case_is_positive():
    rules = rule_matrix(torch.tensor([GOOD]), WINDOW, UNIT)
    assert all(bool(r.item()) for r in rules.values())
    a = assign_windows(torch.tensor([GOOD]), WINDOW, UNIT)
    assert a.positive.tolist() == [True] and a.matched_gt.tolist() == [0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_rule_failing_alone_makes_negative(name):
    box, failing = CASES[name]
    rules = rule_matrix(torch.tensor([box]), WINDOW, UNIT)
    for rule, value in rules.items():
        assert bool(value.item()) == (rule != failing), (name, rule)
    assert assign_windows(torch.tensor([box]), WINDOW, UNIT).positive.tolist() == [False]


def test_scale_floor_is_40_px_and_configurable():
    small = torch.tensor([[30.0, 30.0, 34.0, 34.0]])
    # a window of side 44 at unit 4: 40 <= max(8, 40) passes thanks to the floor
    window44 = torch.tensor([[10.0, 10.0, 54.0, 54.0]])
    assert assign_windows(small, window44, UNIT).positive.tolist() == [True]
    assert assign_windows(small, window44, UNIT, min_size=39.0).positive.tolist() == [False]
    # the 64 px window passes once the floor is raised to 60
    assert assign_windows(small, WINDOW, UNIT, min_size=60.0).positive.tolist() == [True]


def test_uniqueness_failing_alone():
    second = [9.0, 9.0, 55.0, 55.0]  # also satisfies (a)-(c) for the same window
    for box in (GOOD, second):
        assert assign_windows(torch.tensor([box]), WINDOW, UNIT).positive.tolist() == [True]
    both = assign_windows(torch.tensor([GOOD, second]), WINDOW, UNIT)
    assert both.positive.tolist() == [False]


def test_vectorised_over_windows_and_gts():
    windows = torch.tensor([[0.0, 0.0, 64.0, 64.0], [100.0, 100.0, 164.0, 164.0], [0.0, 0.0, 64.0, 64.0]])
    units = torch.tensor([4.0, 4.0, 8.0])  # third: side - unit = 56, centre tolerance 8 px
    gts = torch.tensor([[110.0, 110.0, 150.0, 150.0], [12.0, 12.0, 60.0, 60.0]])  # 2nd: centre (36, 36)
    a = assign_windows(gts, windows, units)
    # window 0: centre offset (4, 4)/4 -> 1.41 > 1 fails; window 2: (4, 4)/8 = 0.71 passes
    assert a.positive.tolist() == [False, True, True]
    assert a.matched_gt[1].item() == 0 and a.matched_gt[2].item() == 1


def test_no_ground_truth():
    a = assign_windows(torch.zeros(0, 4), WINDOW.repeat(3, 1), UNIT.repeat(3))
    assert a.positive.tolist() == [False] * 3 and a.num_positive == 0


def test_mask_targets_crop_window_and_resize():
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 0:20, 0:20] = 1  # top-left quadrant
    masks[1, 20:40, 0:40] = 1  # bottom half
    windows = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0], [-40.0, -40.0, 40.0, 40.0]])
    t = mask_targets(masks, torch.tensor([0, 1, 0]), windows, 4)
    expected0 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]).float()
    expected1 = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]).float()
    # the window reaching outside the image: the object fills only cell (2, 2) of the 4x4 grid
    expected2 = torch.zeros(4, 4)
    expected2[2, 2] = 1
    assert torch.equal(t[0], expected0) and torch.equal(t[1], expected1) and torch.equal(t[2], expected2)
