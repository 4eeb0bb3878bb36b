"""Summarises the traces in a directory (see `jevo.bench.profile_summary`):

    python benchmarks/summarize_profile.py /tmp/prof
"""

from jevo.bench.profile_summary import main

if __name__ == "__main__":
  main()
