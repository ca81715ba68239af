"""Benchmarks: the figures each idea promises, measured, with ratios against baselines.

One module per section, named for the script it measures (bench/sample.py measures sample.py),
the helpers they share in bench/util.py, and the programs that must measure in a fresh process
under bench/children/. bench/__main__.py lists the sections, one line each, and runs them:
`python -m bench --help`. Imports are absolute for the repository's files and relative for
bench's own: inside bench/sample.py, `import sample` is the repository's sample.py and
`from .util import row` is bench's helper."""
