"""Whole-net parity with BVLC Caffe: LeNet, CIFAR10-quick/full (TRAIN, batch 4), CaffeNet and
GoogLeNet (TEST, weights from the numpy recipe), forward and backward."""

import golden
import numpy as np
import pytest


@pytest.mark.parametrize("case", golden.cases("nets", ["lenet", "cifar10_quick", "cifar10_full"]))
def test_small_nets(case):
    golden.run_net_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", golden.cases("nets", ["caffenet", "googlenet"]))
def test_large_nets(case):
    golden.run_net_case(case)


@pytest.mark.parametrize("case", golden.cases("nets", ["caffenet", "googlenet"]))
def test_weight_recipe_matches_its_checksums(case):
    """Our reading of the weight recipe gives the sums and first values the case lists."""
    meta, _ = golden.load_case(case)
    for spec in meta["weight_recipe"]["params"][:6]:
        w = np.random.RandomState(spec["seed"]).standard_normal(spec["shape"]) * spec["scale"]
        w = w.astype(np.float32)
        assert float(w.astype(np.float64).sum()) == pytest.approx(spec["sum"], rel=1e-6)
        np.testing.assert_allclose(w.ravel()[:3], spec["first"], rtol=1e-6)
