"""The command line, typed configs and (later) the profiler, cost model, plan search and launchers."""
