"""The kept-token picture on every family: token → rectangle arithmetic, checked against the
processor's own pixels, and PNGs whose darkened rectangles are exactly the dropped tokens."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_cli
from recipe_compiler.errors import CompileError
from recipe_compiler.families.qwen2_vl import image_grid as qwen2_vl_grid
from recipe_compiler.plots import DROPPED_ALPHA, PANEL_PX, darken, grid_rectangles, kept_tokens, plot_kept_tokens, token_views
from runtime.families.llava_next import view_grids as llava_next_grids
from runtime.families import model_fingerprint
from runtime.recipe import Recipe

PRUNE_AT = 2  # the test recipes drop tokens on entry to this layer only


@pytest.fixture(scope="module")
def nxt():
    from recipe_compiler.models import build_tiny_llava_next

    return build_tiny_llava_next(seed=0)


@pytest.fixture(scope="module")
def qwen():
    from recipe_compiler.models import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(seed=0)


@pytest.fixture(scope="module")
def qwen25():
    from recipe_compiler.models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(seed=0)


@pytest.fixture(scope="module")
def qwen3():
    from recipe_compiler.models import load_model

    return load_model("tiny-qwen3-vl", seed=0)


def _gradient(width, height):
    """x in red, y in green (pixel centres, 0..255 across the image), blue 255 marks real content."""
    from PIL import Image

    rgb = np.zeros((height, width, 3))
    rgb[..., 0] = (np.arange(width)[None, :] + 0.5) / width * 255
    rgb[..., 1] = (np.arange(height)[:, None] + 0.5) / height * 255
    rgb[..., 2] = 255
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def _inputs(loaded, picture):
    return loaded.processor(images=[picture], text=[loaded.format_prompt("Describe the image.")], return_tensors="pt")


def _denormalise(pixels, processor, channel_axis):
    shape = [1] * pixels.dim()
    shape[channel_axis] = 3
    ip = processor.image_processor
    return pixels.double() * torch.tensor(ip.image_std).view(shape) + torch.tensor(ip.image_mean).view(shape)


def _assert_centres_in_rectangles(views, centres, height, width):
    """Every token's true content centre (x, y in pixels of a height×width picture) lies in its rectangle."""
    for name, _, positions in views:
        rows, cols = positions.shape
        rects = grid_rectangles(rows, cols, height, width)
        for r in range(rows):
            for c in range(cols):
                x, y = centres[int(positions[r, c])]
                x0, y0, x1, y1 = rects[r, c]
                assert x0 <= x <= x1 and y0 <= y <= y1, (name, (r, c), (x, y), rects[r, c])


# ----------------------------------------------------------------------------------- pure mapping
@pytest.mark.parametrize("rows, cols, height, width", [
    (24, 24, 96, 96),    # LLaVA-1.5 tiny: 4-px tokens
    (8, 18, 40, 90),     # LLaVA-NeXT high-res view of a wide image
    (18, 8, 90, 40),     # ... and of a tall one
    (10, 16, 300, 451),  # sizes that do not divide
    (5, 11, 40, 88),     # Qwen2-VL merged grid over the resized image
    (1, 1, 7, 3),
])
def test_grid_rectangles_tile_the_picture_with_equal_row_major_rectangles(rows, cols, height, width):
    rects = grid_rectangles(rows, cols, height, width)
    assert rects.shape == (rows, cols, 4)
    x0, y0, x1, y1 = np.moveaxis(rects, -1, 0)
    np.testing.assert_allclose(x1 - x0, width / cols)
    np.testing.assert_allclose(y1 - y0, height / rows)
    assert np.all(x0[:, 0] == 0) and np.allclose(x1[:, -1], width) and np.all(y0[0] == 0) and np.allclose(y1[-1], height)
    np.testing.assert_allclose(x1[:, :-1], x0[:, 1:])  # columns go left to right without gaps
    np.testing.assert_allclose(y1[:-1], y0[1:])  # rows go top to bottom without gaps


@pytest.mark.parametrize("rows, cols, height, width, seed", [
    (24, 24, 96, 96, 0), (8, 18, 40, 90, 1), (10, 16, 300, 451, 2), (5, 11, 41, 89, 3), (3, 2, 2, 3, 4),
])
def test_darken_blackens_exactly_the_pixels_whose_centres_lie_in_dropped_rectangles(rows, cols, height, width, seed):
    rng = np.random.default_rng(seed)
    rgb = rng.random((height, width, 3))
    kept = rng.random((rows, cols)) < 0.5
    expected_dropped = np.zeros((height, width), dtype=bool)
    ys, xs = np.mgrid[:height, :width] + 0.5
    for (r, c), (x0, y0, x1, y1) in zip(np.ndindex(rows, cols), grid_rectangles(rows, cols, height, width).reshape(-1, 4)):
        if not kept[r, c]:
            expected_dropped |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    out = darken(rgb, kept)
    np.testing.assert_allclose(out[~expected_dropped], rgb[~expected_dropped], rtol=1e-6)
    np.testing.assert_allclose(out[expected_dropped], rgb[expected_dropped] * (1 - DROPPED_ALPHA), rtol=1e-6)


@pytest.mark.parametrize("width, height", [(64, 64), (90, 40), (40, 90), (97, 33), (451, 300), (37, 41)])
def test_llava_next_grids_agree_with_the_processors_placeholders_and_the_image_aspect(nxt, width, height):
    (side, side2), (rows, cols) = llava_next_grids(nxt.model.config, height, width)
    placeholders = int((_inputs(nxt, _gradient(width, height))["input_ids"] == nxt.model.config.image_token_index).sum())
    assert side == side2 == nxt.model.config.vision_config.image_size // nxt.model.config.vision_config.patch_size
    assert placeholders == side * side + rows * (cols + 1)  # one newline per high-res row
    # unpadding leaves the image's aspect ratio, to within one token
    assert abs(cols * height / width - rows) <= 1 or abs(rows * width / height - cols) <= 1


@pytest.mark.parametrize("thw, merge, grid", [((1, 16, 16), 2, (8, 8)), ((1, 10, 22), 2, (5, 11)), ((1, 22, 10), 2, (11, 5)),
                                              ((1, 9, 12), 3, (3, 4))])
def test_qwen2_vl_grid_is_the_merged_patch_grid(thw, merge, grid):
    assert qwen2_vl_grid(thw, merge) == grid


@pytest.mark.parametrize("thw", [(2, 16, 16), (1, 15, 16)])
def test_qwen2_vl_grid_refuses_videos_and_unmerged_grids(thw):
    with pytest.raises(CompileError, match="not one still image"):
        qwen2_vl_grid(thw, 2)


# ----------------------------------------------- mapping against the processor's and packer's pixels
@pytest.mark.parametrize("width, height", [(64, 64), (90, 40), (40, 90), (97, 33), (33, 97), (200, 150), (37, 41)])
def test_llava_next_rectangles_hold_the_pixels_the_model_packed_into_each_token(nxt, width, height):
    """Each token's crop patch, read back through transformers' own pack_image_features, shows the
    part of the original image that the picture puts under that token's rectangle."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    config = nxt.model.config
    picture = _gradient(width, height)
    inputs = _inputs(nxt, picture)
    views = token_views(nxt.model, nxt.processor, inputs, picture)
    assert [name for name, _, _ in views] == ["base view", "high-res view"]
    patch = config.vision_config.patch_size
    side = config.vision_config.image_size // patch
    crops = _denormalise(inputs["pixel_values"][0], nxt.processor, channel_axis=1)  # crops, 3, px, px
    n = crops.shape[0]
    means = crops.view(n, 3, side, patch, side, patch).mean(dim=(3, 5)).permute(0, 2, 3, 1).reshape(n, side * side, 3)
    packed, _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [means], [[height, width]], "default",
                                                   image_newline=torch.full((3,), -1.0, dtype=torch.float64))
    placeholders = (inputs["input_ids"][0] == config.image_token_index).nonzero().flatten().tolist()
    assert len(placeholders) == packed[0].shape[0]
    centres, newlines = {}, set()
    for position, (red, green, content) in zip(placeholders, packed[0].tolist()):
        if content < 0:
            newlines.add(position)
        else:  # padding is black: the content's own centre is the channel mean over the content share
            centres[position] = (red / content * width, green / content * height)
    drawn = set(np.concatenate([p.ravel() for _, _, p in views]).tolist())
    assert drawn == set(centres) and not drawn & newlines  # every token drawn once; newlines never
    for _, image, _ in views:
        assert image.shape[:2] == (height, width)  # both views are drawn over the original image
    _assert_centres_in_rectangles(views, centres, height, width)


@pytest.mark.parametrize("family, width, height", [("qwen", 90, 40), ("qwen", 40, 90), ("qwen", 200, 50), ("qwen", 20, 20),
                                                   ("qwen", 128, 128), ("qwen", 300, 37), ("qwen25", 90, 40),
                                                   ("qwen3", 90, 40), ("qwen3", 40, 90)])
def test_qwen2_vl_rectangles_hold_the_pixels_the_encoder_merged_into_each_token(request, family, width, height):
    """Each merged token's patches (the processor's pixel_values rows, merge² per token) show the
    part of the resized image that the picture puts under that token's rectangle (Qwen2.5-VL, Qwen3-VL too)."""
    qwen = request.getfixturevalue(family)
    vision = qwen.model.config.vision_config
    picture = _gradient(width, height)
    inputs = _inputs(qwen, picture)
    [(name, image, positions)] = views = token_views(qwen.model, qwen.processor, inputs, picture)
    _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
    assert image.shape[:2] == (grid_h * vision.patch_size, grid_w * vision.patch_size)  # the processor-resized image
    rows = _denormalise(inputs["pixel_values"].view(grid_h * grid_w, 3, -1), qwen.processor, channel_axis=1).mean(dim=2)
    per_token = rows.view(-1, vision.spatial_merge_size ** 2, 3).mean(dim=1)
    placeholders = (inputs["input_ids"][0] == qwen.model.config.image_token_id).nonzero().flatten().tolist()
    assert sorted(positions.ravel().tolist()) == placeholders
    drawn_h, drawn_w = image.shape[:2]
    centres = {p: (red / blue * drawn_w, green / blue * drawn_h) for p, (red, green, blue) in zip(placeholders, per_token.tolist())}
    _assert_centres_in_rectangles(views, centres, drawn_h, drawn_w)


# ------------------------------------------------------------------------------------ the PNGs
def _solid_red(path, width, height):
    from PIL import Image

    Image.new("RGB", (width, height), (255, 0, 0)).save(path)
    return path


def _pruning_recipe(model):
    fingerprint = model_fingerprint(model)
    v, layers = int(fingerprint["visual_tokens"]), int(fingerprint["num_layers"])
    counts = [v] * PRUNE_AT + [v // 2] * (layers - PRUNE_AT)
    return Recipe(keep_count=np.array(counts), scorer="fitprune", fingerprint=fingerprint)


def _wanted(rows, cols):
    """The top-left quarter of the grid plus the bottom-right token."""
    mask = np.zeros((rows, cols), dtype=bool)
    mask[: rows // 2, : cols // 2] = True
    mask[-1, -1] = True
    return mask


@pytest.mark.parametrize("family, size, views", [
    ("tiny", (120, 96), 1),          # LLaVA-1.5: the square input crop
    ("nxt", (90, 40), 2),            # LLaVA-NeXT: base view + unpadded high-res view (8x18)
    ("qwen", (90, 40), 1),           # Qwen2-VL: 5x11 merged tokens over the 88x40 resized image
])
def test_kept_token_picture_darkens_exactly_the_dropped_tokens_of_every_view(request, tmp_path, family, size, views):
    pytest.importorskip("matplotlib")
    from PIL import Image

    loaded = request.getfixturevalue(family)
    recipe = _pruning_recipe(loaded.model)
    image = _solid_red(tmp_path / "red.png", *size)
    layers = [0, PRUNE_AT, recipe.num_layers - 1]
    found = kept_tokens(loaded, recipe, image, layers)["views"]
    wanted = [_wanted(*view.grid) for view in found]
    replay = {PRUNE_AT: [torch.tensor(np.sort(np.concatenate([v.positions[w] for v, w in zip(found, wanted)])))]}

    forced = kept_tokens(loaded, recipe, image, layers, replay=replay)["views"]
    assert len(forced) == views
    for view, want in zip(forced, wanted):
        assert view.kept[0].all()
        np.testing.assert_array_equal(view.kept[PRUNE_AT], want)
        np.testing.assert_array_equal(view.kept[layers[-1]], want)  # no later pruning layer

    png = plot_kept_tokens(loaded, recipe, image, layers, tmp_path / "tokens.png", title=family, replay=replay)
    with Image.open(png) as im:
        assert im.size == (PANEL_PX[0] * len(layers), PANEL_PX[1] * views)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    dark_red = round(255 * (1 - DROPPED_ALPHA))
    for i, view in enumerate(forced):
        rows, cols = view.grid
        drawn_h, drawn_w = view.image.shape[:2]
        for j, layer in enumerate(layers):
            panel = rgb[i * PANEL_PX[1]:(i + 1) * PANEL_PX[1], j * PANEL_PX[0]:(j + 1) * PANEL_PX[0]]
            red = (panel[..., 0] > 40) & (panel[..., 1] < 15) & (panel[..., 2] < 15)  # the picture, kept or darkened
            ys, xs = np.nonzero(red)
            top, left, height, width = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            assert abs(width / height - drawn_w / drawn_h) < 0.05 * drawn_w / drawn_h, "the picture keeps its aspect ratio"
            centre_y = top + (np.arange(rows) + 0.5) * height / rows
            centre_x = left + (np.arange(cols) + 0.5) * width / cols
            samples = panel[centre_y.astype(int)[:, None], centre_x.astype(int)[None, :], 0]  # red channel, [rows, cols]
            kept = view.kept[layer]
            assert np.all(samples[kept] > 240), (family, view.name, layer)
            assert np.all(np.abs(samples[~kept] - dark_red) < 12), (family, view.name, layer)


@pytest.mark.parametrize("model, views", [("tiny-llava-next", 2), ("tiny-qwen2-vl", 1)])
def test_recipe_eval_show_writes_the_kept_token_picture_for_the_family(tmp_path, capsys, model, views):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from recipe_compiler.evaluate import main as eval_main
    from recipe_compiler.models import load_model

    keep = tmp_path / "keep.safetensors"
    Recipe.keep_all(model_fingerprint(load_model(model).model)).save(keep)
    argv = ["--model", model, "--recipe", str(keep), "--samples", "1", "--new-tokens", "1", "--repeats", "1",
            "--show", str(_solid_red(tmp_path / "red.png", 90, 40)), "--layers", "1,4", "--out", str(tmp_path / "pics")]
    code, out, err = run_cli(capsys, argv, eval_main)
    assert code == 0, err
    with Image.open(tmp_path / "pics" / "tokens-keep.png") as im:
        assert im.size == (PANEL_PX[0] * 2, PANEL_PX[1] * views)
    assert "wrote" in out
