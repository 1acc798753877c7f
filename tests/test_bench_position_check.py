"""bench/position_check.py reads positions the way the evaluator does: real renders give a diagonal confusion, and
a render whose object sits in the other vertical slot from its caption lands in that off-diagonal cell."""

from dataclasses import replace

import numpy as np
import pytest


@pytest.fixture(scope="module")
def check(load_bench):
    return load_bench("position_check")


def one_shape_scenes(n, seed=3):
    from nimblediff.tiny import data

    rng = np.random.default_rng(seed)
    return [data.sample_scene(rng, p_two=0.0) for _ in range(n)]


def test_real_renders_read_on_the_diagonal(check):
    from nimblediff.tiny import data
    from nimblediff.tiny.evaluate import load_evaluator

    scenes = one_shape_scenes(40)
    images = np.stack([data.render(s) for s in scenes])
    pairs = check.read_positions(images, scenes, load_evaluator())
    assert len(pairs) == 40 and all(t == r for t, r in pairs)
    table = check.confusion_table(pairs)
    for row in table[2:]:                         # each caption row: all its prompts in its own column
        cells = [c.strip() for c in row.strip("|").split("|")]
        counts = list(map(int, cells[1:7]))
        assert counts[check.POSITIONS.index(cells[0])] == sum(counts)


def test_a_vertically_swapped_render_is_counted_off_the_diagonal(check):
    from nimblediff.tiny import data
    from nimblediff.tiny.evaluate import load_evaluator

    flip = {"top": "bottom", "bottom": "top"}
    scenes = [s for s in one_shape_scenes(60) if s.shapes[0].position in flip][:6]
    drawn = [replace(s, shapes=(replace(s.shapes[0], position=flip[s.shapes[0].position]),)) for s in scenes]
    pairs = check.read_positions(np.stack([data.render(s) for s in drawn]), scenes, load_evaluator())
    assert pairs == [(s.shapes[0].position, flip[s.shapes[0].position]) for s in scenes]
    assert check.axis_hits(pairs, ("top", "bottom")).tolist() == [0.0] * 6
    assert check.axis_hits(pairs, ("left", "right")).size == 0
