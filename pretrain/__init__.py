"""The model, masking, shard reader, DeepSpeed engine and train loop (``bertforge pretrain``)."""
