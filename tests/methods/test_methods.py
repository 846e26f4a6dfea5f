"""One contract for every registered method: built from its parameters, fitted on a tiny phantom, it predicts one
uint8 instance map per slice at the slices' size; a misspelt parameter is one clear error naming the known ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from comp.core.errors import UserError
from comp.data.contrast import Contrast
from comp.data.dataset import Dataset
from comp.methods.base import FitContext, FoldData
from comp.methods.registry import METHODS, get_method
from comp.pipeline.config import from_dict

SMALL = {  # each method's parameters cut to test size (the rest are its defaults)
    "official_watershed": {},
    "smooth_watershed": {"fit_images": 2},
    "hybrid": {"fit_images": 0, "train_rounds": 2, "workers": 1},
    "unet": {"model": {"encoder": "tu-mobilenetv3_small_100", "decoder_channels": [16, 8, 8, 8, 8], "embedding_dim": 4},
             "train": {"epochs": 1, "batch_size": 4, "resolution": 64}, "workers": 1},  # fmt: skip
}


def test_the_contract_covers_every_registered_method() -> None:
    get_method("hybrid")  # imports every provider module
    shipped = {n for n, spec in METHODS.items() if spec.build.__module__.startswith("comp.")}  # tests register their own too
    assert set(SMALL) == shipped


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_method_fits_and_predicts_uint8_maps_of_the_slices_size(name: str, tiny_phantom: Path, tmp_path: Path) -> None:
    spec = get_method(name)
    method = spec.build(from_dict(spec.params, SMALL[name], "test", "params"))
    data = Dataset(tiny_phantom)
    ann = data.annotated
    method.fit(FoldData(data.x_train[ann], data.y_train[ann], ann), FitContext(tmp_path, 0, 0, Contrast()))
    pred = method.predict(data.x_test[:2])
    assert pred.dtype == np.uint8 and pred.shape == (2, *data.x_test.shape[1:])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_misspelt_parameter_is_one_clear_error(name: str) -> None:
    spec = get_method(name)
    with pytest.raises(UserError, match=r"experiments/x.yaml: unknown key 'params.treshold' \(known: "):
        from_dict(spec.params, {"treshold": 0.5}, "experiments/x.yaml", "params")
