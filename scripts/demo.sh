#!/usr/bin/env bash
# The main job end to end on the bundled digits: spark-submit on a local Spark cluster of two
# executors (local-cluster[2,1,1024]) trains LeNet with MPI all-reduce, extracts features, tests.
source "$(dirname "$0")/env.sh"
exec jobs/demo.sh "$@"
