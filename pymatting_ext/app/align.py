"""--preprocess-alignment: the background plate aligned to each source frame,
for hand-held shots, as upstream's inference scripts do it: features in both
(ORB), matched, a homography from the background to the frame estimated
robustly (MAGSAC++, OpenCV's USAC_MAGSAC), the background warped by it, and
the pixels the warped background does not cover taken from the frame.

Differences from upstream's HomographicAlignment: binary descriptors are
matched by Hamming distance with a cross-check (upstream used the L2 brute
force matcher and kept the best 15% of the matches); MAGSAC++ rather than
RANSAC (on tests/app/test_align.py's hand-held clip RANSAC's warps were off by
up to 1.25 pixels, MAGSAC++'s by 0.35 at most); a still background's
features are computed once, not for every frame; and a frame that cannot be
aligned (too few matches, or no homography) is a clear error instead of a
crash (upstream's issue #83).

Runs in the reader thread, beside the model: OpenCV releases the GIL.
Needs OpenCV (the ``cli`` extra: opencv-python-headless).
"""
from typing import Optional, Tuple

from .common import UserError, numpy_module, require

__all__ = ["BackgroundAligner", "MIN_MATCHES"]

#: The fewest matched features (and RANSAC inliers) a homography is trusted
#: from: it has 8 degrees of freedom, and RANSAC needs some to spare.
MIN_MATCHES = 12


class BackgroundAligner:
    """``aligner(src, bgr, frame)`` -> bgr warped onto src (uint8 (H, W, 3)
    RGB arrays, the same size); ``homography(src, bgr, frame)`` -> the 3x3
    matrix mapping background pixel coordinates to the frame's."""

    def __init__(self, features: int = 4000, reprojection_px: float = 2.0, threads: Optional[int] = None):
        self.cv2 = require("cv2", "--preprocess-alignment")
        if threads is not None:
            # NB: process-wide. On the CPU convert_video gives OpenCV one
            # thread, as FFmpeg gets: the model has the cores, and a second
            # thread pool beside its OpenMP team only preempts it.
            self.cv2.setNumThreads(threads)
        self.np = numpy_module("--preprocess-alignment")
        self.orb = self.cv2.ORB_create(nfeatures=features)
        self.matcher = self.cv2.BFMatcher(self.cv2.NORM_HAMMING, crossCheck=True)
        self.reprojection_px = reprojection_px
        # The last background's features: a still background (the same array
        # every frame) is analysed once.
        self._bgr: Optional[Tuple[object, object, object]] = None

    def _features(self, image):
        gray = self.cv2.cvtColor(image, self.cv2.COLOR_RGB2GRAY)
        return self.orb.detectAndCompute(gray, None)

    def homography(self, src, bgr, frame: int = 0):
        if self._bgr is None or self._bgr[0] is not bgr:
            self._bgr = (bgr, *self._features(bgr))
        _, keys_bgr, desc_bgr = self._bgr
        keys_src, desc_src = self._features(src)
        matches = () if desc_src is None or desc_bgr is None else self.matcher.match(desc_bgr, desc_src)
        if len(matches) < MIN_MATCHES:
            raise UserError(f"--preprocess-alignment: cannot align the background to source frame {frame}: "
                            f"{len(matches)} feature matches, at least {MIN_MATCHES} needed (the background "
                            f"must show the same scene as the frame, with some texture)")
        np = self.np
        from_bgr = np.float32([keys_bgr[m.queryIdx].pt for m in matches])
        to_src = np.float32([keys_src[m.trainIdx].pt for m in matches])
        method = getattr(self.cv2, "USAC_MAGSAC", self.cv2.RANSAC)  # OpenCV >= 4.5
        matrix, inliers = self.cv2.findHomography(from_bgr, to_src, method, self.reprojection_px)
        found = 0 if inliers is None else int(inliers.sum())
        if matrix is None or found < MIN_MATCHES:
            raise UserError(f"--preprocess-alignment: cannot align the background to source frame {frame}: "
                            f"{found} of {len(matches)} feature matches agree on a homography, at least "
                            f"{MIN_MATCHES} needed")
        return matrix

    def __call__(self, src, bgr, frame: int = 0):
        matrix = self.homography(src, bgr, frame)
        h, w = src.shape[:2]
        cv2 = self.cv2
        warped = cv2.warpPerspective(bgr, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        # Where the warped background has no pixels (or blends with the
        # border), the frame's own, as upstream: the difference there is
        # zero, so nothing is matted in. Covered: the background's rectangle,
        # a pixel inside its edges, mapped into the frame.
        np = self.np
        bh, bw = bgr.shape[:2]
        corners = np.float32([[1, 1], [bw - 2, 1], [bw - 2, bh - 2], [1, bh - 2]])[None]
        quad = cv2.perspectiveTransform(corners, matrix)[0]
        covered = np.zeros((h, w), np.uint8)
        # NB: fillPoly, not fillConvexPoly: a strong perspective can map the
        # rectangle to a quadrilateral that is not convex.
        cv2.fillPoly(covered, [np.round(quad * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        uncovered = covered == 0
        warped[uncovered] = src[uncovered]
        return warped
