"""The reconciler's benchmark: a synthetic fleet (`bench.fleet`) and the pass measurements (`bench.run`)."""
