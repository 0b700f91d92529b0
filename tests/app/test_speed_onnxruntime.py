"""`pymatting-ext speed`'s onnxruntime rows: upstream's model exported as
its export_onnx.py does and our own ONNX export, run by onnxruntime beside
upstream and ours with the same weights and inputs (issue 24)."""
import pytest
import torch

from pymatting_ext.app import speed
from pymatting_ext.app.common import UserError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("BackgroundMattingV2.model")


def test_onnxruntime_rows_beside_upstream_and_ours():
    report = speed.run_speed(backbone="mobilenetv2", resolutions=[(96, 64, 0.25, 16 * 40)], device="cpu",
                             backends=["upstream", "auto", speed.ORT_UPSTREAM, speed.ORT_OURS], iterations=1,
                             warmup=0)
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {"upstream", "auto", speed.ORT_UPSTREAM, speed.ORT_OURS}
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["status"])
        assert row["mode"] == "eager" and row["median_ms"] > 0
    table = speed.format_table(report)
    assert "onnxruntime, upstream's ONNX (fp32)" in table and "onnxruntime, our ONNX (fp32)" in table


def test_onnxruntime_rows_compute_the_models_results():
    # The sessions run what they claim: the same outputs as the eager models.
    from BackgroundMattingV2.model import MattingRefine

    torch.manual_seed(0)
    up = MattingRefine("mobilenetv2", 0.25, "sampling", 16 * 40, 0.1, 3, False).eval()
    src, bgr = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        want = up(src, bgr)
    got = speed.onnxruntime_call(speed.ORT_UPSTREAM, up, src, bgr)()
    assert len(got) == 6
    for u, o in zip(want[2:5], got[2:5]):  # the coarse outputs (the refined ones depend on ties)
        assert float((u - torch.from_numpy(o)).abs().max()) < 1e-4


def test_onnxruntime_rows_need_the_cpu():
    if not torch.cuda.is_available():
        with pytest.raises(UserError):
            speed.run_speed(backbone="mobilenetv2", resolutions=[(96, 64)], device="cuda",
                            backends=[speed.ORT_UPSTREAM])
    with pytest.raises(UserError, match="unknown backend"):
        speed.run_speed(backbone="mobilenetv2", resolutions=[(96, 64)], device="cpu", backends=["onnxruntime"])
