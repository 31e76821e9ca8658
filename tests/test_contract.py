"""The numpy preprocessing contract (the ONNX server's, no torch) against the torch eval preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from xrai.data.contract import InputContract, prepare


@pytest.mark.parametrize(("shape", "image_size", "resize_size"), [
    ((300, 200), 224, 256), ((97, 131), 128, 146), ((50, 60), 64, 73), ((120, 90), 65, 75),
    ((64, 64), 80, 64), ((33, 400), 57, 57),
])
def test_numpy_contract_matches_the_torch_preprocessing(shape, image_size, resize_size):
    from xrai.data.augment import preprocess

    rng = np.random.default_rng(sum(shape))
    images = [rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape[::-1], dtype=np.uint8)]
    contract = InputContract(image_size=image_size, resize_size=resize_size)
    ours = prepare(images, contract)
    theirs = preprocess(images, image_size=image_size, resize_size=resize_size).numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (2, 3, image_size, image_size)
    assert np.abs(ours - theirs).max() <= 1e-6


def test_contract_round_trips_through_json_and_refuses_what_it_cannot_do():
    import json

    from xrai.config import TrainConfig

    contract = InputContract.from_config(TrainConfig(data="synthetic", img_size=96))
    assert (contract.image_size, contract.resize_size) == (96, TrainConfig(data="synthetic", img_size=96).resize_size)
    assert InputContract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract
    with pytest.raises(ValueError, match="unknown resize 'squash'"):
        InputContract(image_size=8, resize_size=8, resize="squash")
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        InputContract.from_dict({**contract.to_dict(), "gamma": 2.2})
