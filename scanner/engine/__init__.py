"""The engine: a fixed worker pool over a flow generator (engine), one process's run with
its loop, signals, batching and records (process), forked shards (shards), the dispatch
between them (runner), NDJSON output (output), and the library side of `scan` and `check`.

May import: core, catalog, plan, probes.
"""
