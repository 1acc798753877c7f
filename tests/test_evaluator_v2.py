"""Evaluator v2 (tiny/evaluate.py) against the renderer's exact labels: real renders pass, and every way an image can
disagree with its caption (swap, leak, wrong background, wrong count, noise, another image's caption) fails."""

import os

import numpy as np
import pytest
import torch

from nimblediff.tiny import data, evaluate, heldout

pytestmark = pytest.mark.skipif(not os.path.exists(evaluate.DEFAULT_PATH),
                                reason="weights/tiny/evaluator.safetensors not trained yet")


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(1)
    return evaluate.load_evaluator()


@pytest.fixture(scope="module")
def real():
    images, _, scenes = data.make_batch(77, 120)  # seed used by no other test
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy(), scenes


def scene(shapes, background="gray", say_background=True, say_size=True):
    """Hand-built scene: shapes as (shape, colour, position, size); the caption states what the flags say."""
    labels = tuple(data.ShapeLabel(*s) for s in shapes)
    caption = " and ".join(data.shape_phrase(lab, say_size) for lab in labels)
    caption += f" on a {background} background" if say_background else ""
    return data.Scene(labels, background, caption, tuple((0, 0, 0, (0, 0, 0)) for _ in labels))


def whole(net, image, sc):
    return bool(evaluate.evaluate_v2(image[None], [sc], net)["whole"][0])


TWO = [("circle", "red", "left", "large"), ("square", "blue", "right", "large")]


# ---------------------------------------------------------------- real renders pass


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_real_renders_score_whole_prompt(net, real, sigma):
    images, scenes = real
    images = evaluate.blur(images, sigma) if sigma else images
    result = evaluate.evaluate_v2(images, scenes, net)
    assert result["accuracy"]["whole"] >= 0.99, result["accuracy"]


def test_real_renders_with_mild_noise(net, real):
    images, scenes = real
    assert evaluate.evaluate_v2(evaluate.add_noise(images, 8, seed=1), scenes, net)["accuracy"]["whole"] >= 0.99


def test_unstated_size_is_not_scored(net):
    drawn = scene([("circle", "red", "center", "large")])
    said = scene([("circle", "red", "center", "small")], say_size=False)  # "a red circle in the center"
    assert whole(net, data.render(drawn), said)
    assert not whole(net, data.render(drawn), scene([("circle", "red", "center", "small")]))


# ---------------------------------------------------------------- every disagreement is an error


def test_hand_built_two_shape_scene_is_read(net):
    assert whole(net, data.render(scene(TWO)), scene(TWO))


def test_swapped_colours_are_an_error(net):
    swapped = [("circle", "blue", "left", "large"), ("square", "red", "right", "large")]
    result = evaluate.evaluate_v2(data.render(scene(TWO))[None], [scene(swapped)], net)
    assert not result["whole"][0]
    assert result["accuracy"]["colour"] < 1


def test_swapped_positions_are_an_error(net):
    # v1 paired shapes by position, so this caption scored position 1.0
    swapped = [("circle", "red", "right", "large"), ("square", "blue", "left", "large")]
    result = evaluate.evaluate_v2(data.render(scene(TWO))[None], [scene(swapped)], net)
    assert not result["whole"][0]
    assert result["accuracy"]["position"] < 1


def test_attribute_leak_is_an_error(net):
    # "a yellow circle and a blue triangle" drawn as two yellow circles
    leaked = scene([("circle", "yellow", "left", "small"), ("circle", "yellow", "right", "small")])
    said = scene([("circle", "yellow", "left", "small"), ("triangle", "blue", "right", "small")])
    result = evaluate.evaluate_v2(data.render(leaked)[None], [said], net)
    assert not result["whole"][0]
    assert result["hits"]["count"] == [True]  # both objects are there: the error is in the attributes
    assert result["accuracy"]["colour"] == 0.5 and result["accuracy"]["shape"] == 0.5


@pytest.mark.parametrize("drawn,said", [("black", "white"), ("gray", "black"), ("white", "gray")])
def test_wrong_background_is_an_error(net, drawn, said):
    shapes = [("star", "green", "top", "large")]
    result = evaluate.evaluate_v2(data.render(scene(shapes, drawn))[None], [scene(shapes, said)], net)
    assert result["hits"]["background"] == [False] and not result["whole"][0]
    assert whole(net, data.render(scene(shapes, drawn)), scene(shapes, drawn))


def test_missing_second_shape_fails_count(net):
    one = scene(TWO[:1])
    result = evaluate.evaluate_v2(data.render(one)[None], [scene(TWO)], net)
    assert result["hits"]["count"] == [False] and not result["whole"][0]


# ---------------------------------------------------------------- chance levels stay low


def test_noise_and_blank_images_fail(net, real):
    images, scenes = real
    refs = evaluate.baselines(images, scenes, seed=3)
    for name in ("blank (the caption's own background only)", "pure noise (uniform pixels)"):
        result = evaluate.evaluate_v2(*refs[name], net)
        assert result["accuracy"]["whole"] == 0 and result["accuracy"]["count"] <= 0.02, (name, result["accuracy"])


def test_shuffled_captions_score_low(net, real):
    images, scenes = real
    result = evaluate.evaluate_v2(images, scenes[1:] + scenes[:1], net)
    assert result["accuracy"]["whole"] < 0.1


def test_smooth_noise_is_not_counted(net):
    # low-frequency noise makes blob-like regions; none is a flat shape on a flat background
    noise = evaluate.smooth_noise((20, 64, 64, 3), np.random.default_rng(5))
    _, _, scenes = data.make_batch(78, 20)
    assert evaluate.evaluate_v2(noise, scenes, net)["accuracy"]["count"] <= 0.1


# ---------------------------------------------------------------- intervals and held-out prompts


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(1.96**2 / (10 + 1.96**2), abs=1e-9)  # k = 0: z^2 / (n + z^2)
    lo, hi = evaluate.wilson(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # textbook value for 50/100


def test_paired_difference_on_hand_built_outcomes():
    same = np.array([True, False] * 50)
    assert evaluate.paired_difference(same, same) == (0.0, (0.0, 0.0))  # identical methods: no difference at all
    assert evaluate.paired_difference(np.ones(40, bool), np.zeros(40, bool)) == (1.0, (1.0, 1.0))
    d, (lo, hi) = evaluate.paired_difference(np.r_[np.ones(30), np.zeros(70)], np.zeros(100))  # 30 of 100 better
    assert d == pytest.approx(0.3) and lo < 0.3 < hi and lo > 0.15 and hi < 0.45  # sd sqrt(.3 * .7 / 100) = 0.046


def test_heldout_prompts_are_fixed_proportioned_and_unseen():
    from nimblediff.tiny import train

    held = heldout.heldout_scenes(200)
    assert held == heldout.heldout_scenes(200)
    assert sum(len(s.shapes) == 2 for s in held.scenes) == round(data.P_TWO_SHAPES * 200)
    assert len(set(held.noise_seeds)) == 200
    args = train.parse_args(["--stage", "all"])
    for stage in ("vae", "unet", "flash"):  # training's seeds for step 0 and the last step it could ever reach
        for step in (0, 10**7 - 1):
            assert train.batch_seed(args, stage, step) not in (heldout.HELDOUT_SEED, *held.noise_seeds)
    assert (heldout.HELDOUT_SEED // 10**7) % 1000 not in (1, 2, 3)  # train.batch_seed's stage digits


def test_edge_sharpness_hand_worked_step_edge_and_blur():
    """A white/black vertical step: central differences give (255 - 0) / 2 on the two columns beside the edge (3% of
    the interior pixels, above the top 1%), so the 99th percentile is 127.5; a blurred copy is lower."""
    img = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    img[:, :, 32:] = 255
    assert evaluate.edge_sharpness(img)[0] == pytest.approx(127.5)
    assert evaluate.edge_sharpness(evaluate.blur(img, 1.5))[0] < 100
    assert evaluate.edge_sharpness(np.full((1, 64, 64, 3), 90, np.uint8))[0] == 0
