"""Limits shared by several Ferry nodes (``engine.cluster.limits``): connection leases and
message rates per destination, kept in Redis, with a fall-back to each node's share."""
