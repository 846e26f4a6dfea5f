"""Which data set a command runs on: --data, else the challenge data in data/raw/, else the embedded phantom."""

from __future__ import annotations

from pathlib import Path

from comp.io import Dataset

# The embedded default data set of `make cv` when no challenge data is present: small enough
# for a 2-core CPU, in the exact challenge layout.
EMBEDDED = {"n_train": 1000, "n_labelled": 200, "n_test": 100, "seed": 0}
RAW = Path("data/raw")
PHANTOM = Path("data/phantom")


def resolve_data(arg: str | None) -> Dataset:
    """The data set to use: --data, else data/raw/, else the embedded phantom (generated once per generator version)."""
    if arg:
        return Dataset(Path(arg))
    if (RAW / "Y_train.csv").is_file():
        return Dataset(RAW)
    from comp.data.phantom import generate, stamp

    have = PHANTOM / "PHANTOM.txt"
    print(f"no challenge data in {RAW}/: using the embedded phantom data set ({PHANTOM}/)", flush=True)
    if not have.is_file() or have.read_text() != stamp(**EMBEDDED):
        generate(PHANTOM, **EMBEDDED)
    return Dataset(PHANTOM, name="phantom")
