"""plot_confusion: a confusion matrix drawn to an image file."""

import pytest
import torch

from kdforge.diagnostics.confusion import plot_confusion, row_normalised
from kdforge.errors import KdforgeError, ShapeError


def test_rows_are_normalised_by_their_own_sum():
    shares = row_normalised(torch.tensor([[2, 1, 1], [0, 0, 0], [0, 3, 1]]))
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 0.0], [0.0, 0.75, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(shares, expected, rtol=1e-12, atol=1e-12)


def test_a_small_matrix_with_names_is_written(tmp_path):
    path = plot_confusion([[5, 1, 0], [2, 3, 1], [0, 0, 4]], tmp_path / "sub" / "confusion.png",
                          class_names=["disc", "square", "triangle"], title="student, epoch 3")
    assert path == tmp_path / "sub" / "confusion.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, no temporary left behind


@pytest.mark.parametrize("suffix, magic", [("", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_the_format_follows_the_suffix(tmp_path, suffix, magic):
    path = plot_confusion([[3, 1], [0, 2]], tmp_path / f"c{suffix}")
    assert path.suffix == (suffix or ".png") and path.read_bytes().startswith(magic)


def _cell_texts(monkeypatch) -> dict:
    """Record every text that plot_confusion writes at a cell: {(row, column): text}."""
    from matplotlib.axes import Axes

    cells, original = {}, Axes.text

    def text(self, x, y, s, *args, **kwargs):
        cells[(y, x)] = s
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "text", text)
    return cells


def test_counts_are_written_in_their_cells(tmp_path, monkeypatch):
    cells = _cell_texts(monkeypatch)
    matrix = [[5, 1, 0], [2, 3, 1], [0, 0, 4]]
    plot_confusion(torch.tensor(matrix), tmp_path / "c.png")
    assert cells == {(r, p): str(matrix[r][p]) for r in range(3) for p in range(3)}


def test_a_large_matrix_is_drawn_without_counts(tmp_path, monkeypatch):
    cells = _cell_texts(monkeypatch)
    matrix = torch.randint(0, 50, (40, 40), generator=torch.Generator().manual_seed(0))
    path = plot_confusion(matrix.numpy(), tmp_path / "big.png", class_names=[f"class {i}" for i in range(40)])
    assert not cells and path.stat().st_size > 5000


@pytest.mark.parametrize("matrix, names, message", [
    ([[1, 2, 3]], None, "must be square"),
    ([[1.5, 0], [0, 1]], None, "non-negative integers"),
    ([[1, -1], [0, 1]], None, "non-negative integers"),
    ([[1, 0], [0, 1]], ["a"], "1 class names for a confusion matrix of 2 classes"),
])
def test_bad_input_is_explained(tmp_path, matrix, names, message):
    with pytest.raises(ShapeError, match=message):
        plot_confusion(matrix, tmp_path / "c.png", class_names=names)


def test_an_unknown_format_is_explained(tmp_path):
    with pytest.raises(KdforgeError, match=r"unknown image format '.bmpx'"):
        plot_confusion([[1]], tmp_path / "c.bmpx")
