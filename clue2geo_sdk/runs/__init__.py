"""Batch runs: the run loop, the record and its identity, the journal, exports, the hash chain."""
