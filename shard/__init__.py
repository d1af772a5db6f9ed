"""Shard: model code, KV cache, batches and the gRPC servicer of one tensor-parallel rank."""
