"""convert_video on a GPU: its copy stream, pinned buffers and per-batch-shape
CUDA graphs give the model's own outputs on the same GPU. (On the CPU, and
the command line: test_cli.py.) Skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm

from conftest import needs_cuda
from helpers import random_bn_

pytestmark = needs_cuda


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["cuda-eager", "cuda-graph"])
def test_convert_video_on_the_gpu_equals_the_model(tmp_path, cuda_graph):
    """PNG frames in, PNG outputs out (no PyAV needed): the pipeline's copy
    stream, pinned buffers and per-batch-shape graphs (5 frames in batches
    of 2: a last batch of 1 captures a second graph) give the model's own
    outputs on the same GPU, to within one 8-bit step."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    from pymatting_ext.app import synthetic
    from pymatting_ext.models import MattingRefine

    H, W, frames = 180, 322, 5  # 322: padded to 324 and cropped back
    background = synthetic._synthetic_background(W, H)
    Image.fromarray(background).save(tmp_path / "bgr.png")
    (tmp_path / "src").mkdir()
    decoded = []
    for i in range(frames):
        frame = synthetic._synthetic_frame(background, i / (frames - 1))
        Image.fromarray(frame).save(tmp_path / "src" / f"{i:03d}.png")
        decoded.append(frame)
    torch.manual_seed(0)
    model = random_bn_(MattingRefine("mobilenetv2", 0.25, "sampling", 4_000)).cuda().eval()
    result = pm.convert_video(model, str(tmp_path / "src"), str(tmp_path / "bgr.png"), str(tmp_path / "out"),
                              outputs=("pha", "fgr"), output_format="png", batch_size=2,
                              cuda_graph=cuda_graph, progress=False)
    assert result["frames"] == frames and result["device"].startswith("cuda")

    def as_input(image):
        x = torch.from_numpy(np.array(image)).cuda().permute(2, 0, 1)[None].float().div_(255)
        return F.pad(x, (0, 2, 0, 0), mode="replicate")

    bgr = as_input(background)
    for i, frame in enumerate(decoded):
        with torch.inference_mode():
            pha, fgr = model(as_input(frame), bgr)[:2]
        want = {"pha": pha[:, :, :, :W], "fgr": fgr[:, :, :, :W]}
        for name, value in want.items():
            got = torch.from_numpy(np.array(Image.open(tmp_path / "out" / name / f"{i:05d}.png"))).cuda()
            ref = value.float().mul(255).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).squeeze(-1)
            assert got.shape == ref.shape, name
            assert int((got.int() - ref.int()).abs().max()) <= 1, (name, i)
