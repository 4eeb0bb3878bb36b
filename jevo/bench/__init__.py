"""The profile benchmark, `python -m jevo.bench`: the four Evoformer attentions and one block,
forward and forward+backward, on jevo's backends and the other libraries installed here, side by
side; a table, a JSON results file, PNG plots, and a `jax.profiler` trace of the block with the
device time per sub-module. `python -m jevo.bench --help` lists the presets and options."""
