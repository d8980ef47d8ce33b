"""The ends of the pipeline: where a backup reads (sources) and writes (sinks), where a restore
reads (feeds) and writes (targets), and the guards that keep both off what they protect."""
