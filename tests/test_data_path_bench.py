"""benchmarks/data_path.py's harness: one quick run at tiny sizes writes every field, each a positive number."""

import json

from benchmarks import data_path


def test_data_path_benchmark_quick_run_writes_its_figures(tmp_path):
    out = tmp_path / "data_path.json"
    assert data_path.main(["--quick", "--files", "12", "--size", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    one = result["workers"]["1"]
    for key in ("today_img_per_s_per_worker", "lean_img_per_s_per_worker", "ratio_lean_over_today_median",
                "ratio_min", "ratio_max"):
        assert one[key] > 0, key
    assert len(one["rounds"]["today"]) == len(one["rounds"]["lean"]) == 1
    assert result["device_augment_cpu_ms_per_img_at_batch_64"] > 0
    assert set(result["decode_choices_ms_per_img"]) >= {"decode_jpeg+torchvision_uint8_crop",
                                                          "pil_draft_decode+pil_resize_box"}
    assert all(v > 0 for v in result["decode_choices_ms_per_img"].values())
    assert result["setup"]["augment_today"]["auto_augment"] == "rand-m9-mstd0.5-inc1"  # read from proteus.toml
    assert isinstance(result["done_when_3x_per_worker"], bool)
