"""ar_course.files: output paths are checked before work, and writes are all-or-nothing."""

import os

import pytest
import torch

from ar_course.checkpoint import load_checkpoint, save_checkpoint
from ar_course.files import atomic_path, atomic_write_text, check_output_path, save_figure


def test_check_output_path_accepts_new_file_in_new_folder(tmp_path):
    assert check_output_path(tmp_path / "a" / "b" / "out.png", suffix=".png") == tmp_path / "a" / "b" / "out.png"


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is a folder"),
    (lambda d: (d / "f.txt").write_text("x") and d / "f.txt" / "out.png", "is a file, not a folder"),
])
def test_check_output_path_rejects(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        check_output_path(make(tmp_path), suffix=".png")


def test_check_output_path_suffix_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r"must name a \.png file"):
        check_output_path(tmp_path / "out.jpg", suffix=".png")
    with pytest.raises(ValueError, match="empty"):
        check_output_path("")


def test_check_output_path_accepts_an_upper_case_suffix(tmp_path):
    """The extension is compared case-insensitively: IMG.PNG is a .png file."""
    assert check_output_path(tmp_path / "IMG.PNG", suffix=".png") == tmp_path / "IMG.PNG"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write into read-only folders")
def test_check_output_path_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write"):
            check_output_path(ro / "out.png")
    finally:
        ro.chmod(0o755)


def test_check_output_path_unwritable_for_everyone():
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    with pytest.raises(ValueError, match="cannot write"):
        check_output_path("/proc/self/out.json")


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert out.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary file left behind


def test_atomic_write_text_replaces_with_ordinary_mode(tmp_path):
    out = atomic_write_text(tmp_path / "sub" / "out.txt", "new")
    assert out.read_text(encoding="utf-8") == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_checkpoint_gets_an_ordinary_file_mode(tmp_path):
    """safetensors' save_file creates its file private (0600) whatever the umask: checkpoints are written as bytes
    through atomic_path instead, so another user or a container of another uid can read what was trained."""
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2)}, {})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert torch.equal(load_checkpoint(path)[0]["w"], torch.ones(2))


class _Figure:
    """Stands in for a matplotlib figure: ``savefig`` writes ``data``, or fails half-way."""

    def __init__(self, data: bytes, fail: bool = False):
        self.data, self.fail, self.calls = data, fail, []

    def savefig(self, path, **kwargs):
        self.calls.append(kwargs)
        with open(path, "wb") as f:
            f.write(self.data[:2])
            if self.fail:
                raise RuntimeError("renderer died")
            f.write(self.data[2:])


def test_save_figure_writes_in_place_and_keeps_old_file_on_failure(tmp_path):
    out = tmp_path / "plots" / "a.png"
    fig = _Figure(b"new-png")
    assert save_figure(fig, out, dpi=90) == out
    assert out.read_bytes() == b"new-png" and fig.calls == [{"format": "png", "dpi": 90}]
    with pytest.raises(RuntimeError, match="renderer died"):
        save_figure(_Figure(b"broken", fail=True), out)
    assert out.read_bytes() == b"new-png"
    assert [p.name for p in out.parent.iterdir()] == ["a.png"]  # no temporary file left behind
    save_figure(_Figure(b"<svg/>"), tmp_path / "b.svg")
    assert (tmp_path / "b.svg").read_bytes() == b"<svg/>"


def test_save_figure_writes_the_format_of_the_suffix(tmp_path):
    """A real matplotlib figure saved as .pdf is a PDF, as .svg an SVG, and with no suffix a PNG."""
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    try:
        assert save_figure(fig, tmp_path / "plot.pdf").read_bytes()[:4] == b"%PDF"
        assert save_figure(fig, tmp_path / "plot.svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
        assert save_figure(fig, tmp_path / "plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close(fig)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_replacing_a_file_keeps_its_mode(tmp_path, mode):
    """A private file (0600) replaced by an atomic write must not become readable by others (0644)."""
    path = tmp_path / "secret.txt"
    path.write_text("old")
    path.chmod(mode)
    atomic_write_text(path, "new")
    assert path.read_text(encoding="utf-8") == "new" and path.stat().st_mode & 0o777 == mode
    save_checkpoint(path, {"w": torch.ones(2)}, {})
    assert path.stat().st_mode & 0o777 == mode



def test_a_read_only_file_is_replaced_and_stays_read_only(tmp_path):
    """The mode is copied once the temporary file is written: copied before, a 0444 mode made the temporary file
    unwritable for anyone but root (a PermissionError naming a hidden temporary path)."""
    path = tmp_path / "f.txt"
    path.write_text("old")
    os.chmod(path, 0o444)
    with atomic_path(path) as tmp:
        assert os.stat(tmp).st_mode & 0o200  # the owner may write it, whatever the file it replaces allows
        tmp.write_text("new")
    assert path.read_text(encoding="utf-8") == "new" and os.stat(path).st_mode & 0o777 == 0o444
