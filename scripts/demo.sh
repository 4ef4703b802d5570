#!/usr/bin/env bash
# The main job end to end on the bundled digits: prepare LMDBs, train LeNet, test it.
source "$(dirname "$0")/env.sh"
python data/prepare_digits.py work
python -m engine train --solver conf/lenet/lenet_solver.prototxt
python -m engine test --model conf/lenet/lenet_train_test.prototxt \
  --weights work/lenet_iter_300.caffemodel --iterations 5
