"""Child programs of the bench sections: each measures one thing in a fresh process (its own peak
memory, nothing an earlier run freed to reuse) and prints its result as the last line of stdout.
bench.util.run_child starts them as `python -m bench.children.<name> ARGS` from the repository root."""
