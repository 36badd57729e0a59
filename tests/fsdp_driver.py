"""Run under torchrun by tests/test_fsdp.py: train each config given on the command line, one after another,
in the same processes and process group (one launch instead of one per method keeps the suite short)."""

import sys

import torch.distributed as dist

from deltatune.train import load_train_config, train

if __name__ == "__main__":
    dist.init_process_group("gloo")  # kept across the runs: train() leaves a group it did not create
    try:
        for path in sys.argv[1:]:
            train(load_train_config(path))
    finally:
        dist.destroy_process_group()
