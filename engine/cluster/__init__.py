"""Limits shared by several Ferry nodes (``engine.cluster.limits``): connection leases and
message rates per destination, kept in Redis, with a fall-back to each node's share; the
same limits for the workers of one node, kept by its supervisor (``engine.cluster.node``),
both behind one interface (``engine.cluster.api``)."""
