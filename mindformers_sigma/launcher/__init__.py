"""`run/distributed_train.sh`: plan a multi-rank launch, check it, start the ranks and supervise them."""
