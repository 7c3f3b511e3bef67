"""Peer-server comparisons: oodserve beside another model server on the same bundle, same machine, same run
(`python -m oodserve.bench.peers.compare`)."""
