"""Figure helpers: what they draw (read back from the matplotlib artists) and how they refuse bad input."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmlite import plot  # noqa: E402


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_image_grid_takes_both_layouts_and_checks_titles():
    hwc = np.zeros((4, 8, 8, 3), np.uint8)
    hwc[0, :, :, 0] = 255
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)  # (4, 3, 8, 8)
    for images in (hwc, chw):
        fig = plot.image_grid(images, titles=["a", "b", "c", "d"], ncols=3)
        shown = [a.images[0].get_array() for a in fig.axes if a.images]
        assert len(fig.axes) == 6 and len(shown) == 4  # 2 rows of 3, the last two empty
        np.testing.assert_allclose(shown[0][..., 0], 1.0)  # uint8 255 -> 1.0, channels last
        plt.close(fig)
    with pytest.raises(ValueError, match="4 images but 3 titles"):
        plot.image_grid(hwc, titles=["a", "b", "c"])
    with pytest.raises(ValueError, match="3 dims"):
        plot.image_grid(np.zeros((2, 8, 8)))


def test_attention_overlay_reshapes_weights_to_the_grid(ax):
    weights = torch.arange(16.0)
    plot.attention_overlay(ax, np.zeros((32, 32, 3)), weights, title="w")
    overlay = ax.images[1].get_array()
    assert overlay.shape == (4, 4) and overlay[1, 0] == 4.0  # row-major: region 4 starts the second row
    assert ax.images[1].get_extent() == [-0.5, 31.5, 31.5, -0.5]  # stretched over the whole image
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        plot.attention_overlay(ax, np.zeros((32, 32, 3)), np.ones(10), grid=(3, 3))


def test_heatmap_annotates_every_cell(ax):
    m = np.array([[0.0, 1.0], [0.25, 0.5]])
    plot.heatmap(ax, m, row_labels=["r1", "r2"], col_labels=["c1", "c2"], annotate=True)
    assert sorted(t.get_text() for t in ax.texts) == ["0.00", "0.25", "0.50", "1.00"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["r1", "r2"]
    with pytest.raises(ValueError, match="2-D matrix"):
        plot.heatmap(ax, np.zeros(3))


def test_curves_plot_each_series_from_step_one(ax):
    plot.curves(ax, {"train": [3.0, 2.0, 1.0], "val": [3.5, 2.5]}, logy=True, title="t")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train"].get_xdata()) == [1, 2, 3] and list(lines["val"].get_ydata()) == [3.5, 2.5]
    assert ax.get_yscale() == "log"


def test_box_is_centred_and_arrow_joins_two_points(ax):
    patch = plot.box(ax, (2.0, 1.0), "encoder", w=1.0, h=0.5)
    x0, y0 = patch.get_x(), patch.get_y()
    assert (x0 + patch.get_width() / 2, y0 + patch.get_height() / 2) == (2.0, 1.0)
    assert [t.get_text() for t in ax.texts] == ["encoder"] and ax.texts[0].get_position() == (2.0, 1.0)
    arrow = plot.arrow(ax, (0.0, 0.0), (1.0, 1.0))
    assert arrow in ax.patches and patch in ax.patches
    with pytest.raises(ValueError, match="positive width and height"):
        plot.box(ax, (0, 0), w=0)
    with pytest.raises(ValueError, match="two different points"):
        plot.arrow(ax, (1, 1), (1, 1))
