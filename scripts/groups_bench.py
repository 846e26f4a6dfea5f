"""How well `comp data groups` recovers scans (issue 23): the proxy's two CT scans, every slice and every 5th / 10th,
shuffled and mixed with 100 phantom slices (each its own "scan"), rendered with one window or a window per slice.

Usage: .venv/bin/python scripts/groups_bench.py [--no-fov] [ONE_WINDOW_DIR PER_SLICE_DIR] (default data/proxy and
data/proxy_ps: `make proxy` and the per-slice proxy of scripts/as_it_comes.sh); --no-fov links slices by their body
outlines only, as on native slices with no padding.
Prints the adjusted Rand index between inferred and true scans, and how well the inferred order follows the slices'
true order (|Spearman rho| over the labelled scan)."""

import sys
import time

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

from comp.data.calibration import HU_WINDOW
from comp.data.contrast import PER_SLICE_EXAMPLE, draw_windows
from comp.data.dataset import Dataset
from comp.data.groups import FOV_LINK, infer_scans
from comp.data.phantom import render_slice

ROOTS = {"one window": "data/proxy", "per slice": "data/proxy_ps"}


def main() -> int:
    fov_link = 0.0 if "--no-fov" in sys.argv[1:] else FOV_LINK
    dirs = [a for a in sys.argv[1:] if a != "--no-fov"]
    roots = dict(zip(ROOTS, dirs)) if len(dirs) == 2 else ROOTS
    print("| rendering | slices kept | slices (real + phantom) | scans found (largest) | ARI | order rho | seconds |\n|---|---|---|---|---|---|---|")
    for rendering, root in roots.items():
        data = Dataset(root)
        vol = np.unique(data.groups_table()["volume"], return_inverse=True)[1]
        windows = draw_windows(PER_SLICE_EXAMPLE, 100, np.random.default_rng(7)) if rendering == "per slice" else np.tile(HU_WINDOW, (100, 1))
        phantom = np.stack([render_slice(10_000 + i, window=tuple(w))[0] for i, w in enumerate(windows)])
        for every in (1, 5, 10):
            keep = np.concatenate([np.flatnonzero(vol == v)[::every] for v in np.unique(vol)])
            x = np.concatenate([data.x_train[keep], phantom])
            truth = np.concatenate([vol[keep], vol.max() + 1 + np.arange(len(phantom))])
            perm = np.random.default_rng(every).permutation(len(x))
            t0 = time.time()
            scans = infer_scans(x[perm], fov_link=fov_link)
            seconds = time.time() - t0
            position = np.empty(len(x), np.int64)
            position[perm] = scans.position
            first = np.flatnonzero(truth == 0)
            rho = abs(spearmanr(position[first], np.arange(len(first))).correlation)
            print(f"| {rendering} | every {every} | {len(keep)} + {len(phantom)} | {len(scans.sizes())} ({', '.join(map(str, scans.sizes()[:3]))}) | "
                  f"{adjusted_rand_score(truth[perm], scans.scan):.3f} | {rho:.3f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
